//! PostgreSQL: connecting, the embedded migrations, and telling passing faults from real ones.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

/// The schema, embedded from `migrations/`; applied by `rotate-keys init`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// The local database that `scripts/services up` creates.
pub const LOCAL_DATABASE_URL: &str = "postgres://pii_vault:pii_vault@127.0.0.1:5432/pii_vault";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL {url}: {source}")]
    InvalidUrl {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot connect to PostgreSQL at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "the database schema is not current (migration {missing} is not applied): \
         run `rotate-keys init` with a role that may change the schema"
    )]
    SchemaOutdated { missing: i64 },
    #[error(
        "the database schema has migration {0}, which this build does not know: upgrade pii-vault"
    )]
    SchemaNewer(i64),
    #[error("migrating the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Query(#[from] sqlx::Error),
}

/// The URL with its password replaced, fit for error messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparseable url>".to_owned();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// A pool of at most `max_connections`. One connection is made first, so that an unreachable
/// server or a refused login fails at once with its own error (a pool would retry until its
/// timeout and report only that).
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url.parse().map_err(|source| DbError::InvalidUrl {
        url: redact_url(url),
        source,
    })?;
    let options = options.application_name("pii-vault");
    let probe = PgConnection::connect_with(&options)
        .await
        .map_err(|source| DbError::Connect {
            url: redact_url(url),
            source,
        })?;
    let _ = probe.close().await;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options))
}

/// Applies the embedded migrations (needs rights to change the schema).
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Refuses to run against a schema this build does not match, without needing DDL rights.
pub async fn check_schema(pool: &PgPool) -> Result<(), DbError> {
    let applied: Vec<i64> = match sqlx::query_scalar(
        "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(pool)
    .await
    {
        Ok(applied) => applied,
        // No migrations table: nothing was ever applied.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    if let Some(missing) = MIGRATOR
        .iter()
        .map(|m| m.version)
        .find(|v| !applied.contains(v))
    {
        return Err(DbError::SchemaOutdated { missing });
    }
    if let Some(unknown) = applied
        .iter()
        .find(|v| !MIGRATOR.iter().any(|m| m.version == **v))
    {
        return Err(DbError::SchemaNewer(*unknown));
    }
    Ok(())
}

/// Faults that pass by themselves: the connection broke, the server is restarting or
/// overloaded, a serialization conflict. Anything else (a constraint, bad data, a missing
/// privilege) will fail the same way again.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(e) => e.code().is_some_and(|code| {
            // 08: connection exception; 53: insufficient resources; 57P0x: shutdown and
            // crash recovery; 40001/40P01: serialization failure, deadlock.
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P0")
                || code == "40001"
                || code == "40P01"
        }),
        _ => false,
    }
}

/// A database of its own for a unit test that needs PostgreSQL: created and migrated on the
/// server at `DATABASE_URL` (as `scripts/services up` sets it up), dropped by [`Scratch::drop`]
/// (left in place when the test fails, for inspection).
#[cfg(test)]
pub(crate) mod scratch {
    use super::*;

    pub struct Scratch {
        pub pool: PgPool,
        name: String,
        base: String,
    }

    impl Scratch {
        pub async fn new() -> Self {
            static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let base =
                std::env::var("DATABASE_URL").unwrap_or_else(|_| LOCAL_DATABASE_URL.to_owned());
            let admin = connect(&base, 1).await.unwrap_or_else(|e| {
                panic!("PostgreSQL is not reachable ({e}); start it with `scripts/services up`")
            });
            let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = format!("pii_vault_unit_{}_{serial}", std::process::id());
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&admin)
                .await
                .unwrap();
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&admin)
                .await
                .expect(
                    "creating a scratch database (the role needs CREATEDB; see scripts/services)",
                );
            admin.close().await;
            let (prefix, _) = base.rsplit_once('/').expect("database URL ends in /name");
            let pool = connect(&format!("{prefix}/{name}"), 4).await.unwrap();
            migrate(&pool).await.unwrap();
            Self { pool, name, base }
        }

        /// A pool logged in as `user`, one of the local users `scripts/services up` creates
        /// (password = name), on this database.
        pub async fn pool_as(&self, user: &str) -> PgPool {
            let (prefix, _) = self
                .base
                .rsplit_once('/')
                .expect("database URL ends in /name");
            let (_, host) = prefix
                .rsplit_once('@')
                .expect("database URL has credentials");
            connect(&format!("postgres://{user}:{user}@{host}/{}", self.name), 2)
                .await
                .unwrap_or_else(|e| panic!("connecting as {user} ({e}): run `scripts/services up`"))
        }

        pub async fn drop(self) {
            self.pool.close().await;
            let admin = connect(&self.base, 1).await.unwrap();
            sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
                .execute(&admin)
                .await
                .unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_only_the_password() {
        assert_eq!(
            redact_url("postgres://pii_vault:s3cret@db:5432/pii_vault"),
            "postgres://pii_vault:***@db:5432/pii_vault"
        );
        assert_eq!(redact_url("postgres://user@db/x"), "postgres://user@db/x");
        assert_eq!(
            redact_url("postgres://u:p@ss@db/x"),
            "postgres://u:***@db/x"
        );
        assert_eq!(redact_url("garbage"), "<unparseable url>");
    }

    #[test]
    fn migrations_are_embedded() {
        assert!(MIGRATOR.iter().count() >= 1);
    }
}
