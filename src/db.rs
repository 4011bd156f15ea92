//! PostgreSQL: connecting, the embedded migrations, and telling passing faults from real ones.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

/// The schema, embedded from `migrations/`; applied by `rotate-keys init`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// The local database that `scripts/services up` creates.
pub const LOCAL_DATABASE_URL: &str = "postgres://pii_vault:pii_vault@127.0.0.1:5432/pii_vault";

/// The local role administrator that `scripts/services up` creates (see [`migrate_with`]).
pub const LOCAL_ROLE_ADMIN_URL: &str =
    "postgres://pii_vault_roleadmin:pii_vault_roleadmin@127.0.0.1:5432/pii_vault";

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
    #[error(
        "migrating the database needs the role administrator: set ROLE_ADMIN_DATABASE_URL \
         (README, \"Migrating a deployment\"): {0}"
    )]
    NeedsRoleAdmin(#[source] sqlx::Error),
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

/// Applies the embedded migrations as the schema owner (`owner`'s user); see [`migrate_with`].
pub async fn migrate(owner: &PgPool, role_admin: Option<&PgPool>) -> Result<(), DbError> {
    migrate_with(&MIGRATOR, owner, role_admin).await
}

/// The advisory lock (in the role administrator's database) that serializes migration windows
/// across processes; held by whoever needs no window to be open meanwhile.
pub const MIGRATION_WINDOW_LOCK: i64 = 8_100_121_361_964_690_549;

/// Applies `migrator`'s pending migrations as the schema owner.
///
/// The owner is not a member of `pii_vault_door`, the role that owns the doors and the audit's
/// trigger functions, and holds no CREATEROLE (with it, it could grant itself the door).
/// Migrations that create or replace doors need both, so `role_admin` (a login with
/// CREATEROLE: RDS's master user; locally `pii_vault_roleadmin`) opens a window: it grants
/// them for the run and takes both back afterwards, whatever happened. Windows are serialized
/// by [`MIGRATION_WINDOW_LOCK`], so concurrent migrations never close each other's. Without
/// `role_admin` the owner must hold the rights itself (a superuser).
/// Nothing is pending: no window is opened.
pub async fn migrate_with(
    migrator: &Migrator,
    owner: &PgPool,
    role_admin: Option<&PgPool>,
) -> Result<(), DbError> {
    let applied = applied_migrations(owner).await?;
    if migrator.iter().all(|m| applied.contains(&m.version)) {
        return Ok(());
    }
    let Some(role_admin) = role_admin else {
        return migrator.run(owner).await.map_err(|source| match source {
            sqlx::migrate::MigrateError::Execute(e) if is_permission_denied(&e) => {
                DbError::NeedsRoleAdmin(e)
            }
            other => DbError::Migrate(other),
        });
    };
    let window = MigrationWindow::open(role_admin, owner).await?;
    let ran = migrator.run(owner).await;
    let closed = window.close().await;
    ran?;
    closed
}

/// The owner lent the door role and CREATEROLE by the role administrator, for a migration or
/// a restore (both make `pii_vault_door` the owner of functions), until [`MigrationWindow::close`].
/// Opening waits for any other window ([`MIGRATION_WINDOW_LOCK`]).
pub struct MigrationWindow {
    admin: sqlx::pool::PoolConnection<sqlx::Postgres>,
    owner: String,
}

impl MigrationWindow {
    pub async fn open(role_admin: &PgPool, owner: &PgPool) -> Result<Self, DbError> {
        let owner: String = sqlx::query_scalar("SELECT quote_ident(current_user)")
            .fetch_one(owner)
            .await?;
        let mut admin = role_admin.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_WINDOW_LOCK)
            .execute(&mut *admin)
            .await?;
        let lent = sqlx::raw_sql(&format!(
            "GRANT pii_vault_door TO {owner}; ALTER ROLE {owner} CREATEROLE;"
        ))
        .execute(&mut *admin)
        .await;
        let window = Self { admin, owner };
        match lent {
            Ok(_) => Ok(window),
            Err(error) => {
                let _ = window.close().await;
                Err(error.into())
            }
        }
    }

    /// Takes both back, then lets the next window open.
    pub async fn close(mut self) -> Result<(), DbError> {
        let owner = &self.owner;
        let taken = sqlx::raw_sql(&format!(
            "REVOKE pii_vault_door FROM {owner}; ALTER ROLE {owner} NOCREATEROLE;"
        ))
        .execute(&mut *self.admin)
        .await;
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATION_WINDOW_LOCK)
            .execute(&mut *self.admin)
            .await?;
        taken?;
        Ok(())
    }
}

/// The database refused the statement for want of a privilege (SQLSTATE 42501).
pub fn is_permission_denied(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("42501"))
}

/// The versions of the migrations applied to `pool`'s database (none before the first).
async fn applied_migrations(pool: &PgPool) -> Result<Vec<i64>, DbError> {
    match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(pool)
        .await
    {
        Ok(applied) => Ok(applied),
        // No migrations table: nothing was ever applied.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// Refuses to run against a schema this build does not match, without needing DDL rights.
pub async fn check_schema(pool: &PgPool) -> Result<(), DbError> {
    let applied = applied_migrations(pool).await?;
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

/// What watches the schema owner, who can still act past the doors (it owns the tables: it may
/// disable their triggers), as any login can see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerWatch {
    /// The owner of the tables.
    pub owner: String,
    /// pgaudit's session classes in force (`pgaudit.log`); `None` where pgaudit is not loaded.
    pub pgaudit_log: Option<String>,
    /// Whether the owner holds the door role now: a migration window is open, or a killed
    /// migration left it open.
    pub owner_is_door: bool,
}

impl OwnerWatch {
    pub async fn read(pool: &PgPool) -> Result<Self, sqlx::Error> {
        let (owner, pgaudit_log, owner_is_door) = sqlx::query_as(
            "SELECT t.tableowner::text, current_setting('pgaudit.log', true),
                    pg_has_role(t.tableowner, 'pii_vault_door', 'MEMBER')
             FROM pg_tables t WHERE t.schemaname = 'public' AND t.tablename = 'unmask_audit'",
        )
        .fetch_one(pool)
        .await?;
        Ok(Self {
            owner,
            pgaudit_log,
            owner_is_door,
        })
    }

    /// pgaudit logs the owner's DDL (a trigger disabled) and role changes outside the database.
    pub fn watched(&self) -> bool {
        self.pgaudit_log.as_deref().is_some_and(|log| {
            let classes: Vec<String> = log
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .collect();
            let has = |class: &str| classes.iter().any(|c| c == class || c == "all");
            has("ddl") && has("role")
        })
    }

    /// One line for an operator.
    pub fn describe(&self) -> String {
        let watch = match (&self.pgaudit_log, self.watched()) {
            (Some(log), true) => format!("watched by pgaudit ({log})"),
            (Some(log), false) => format!(
                "UNWATCHED: pgaudit.log is '{log}'; it must include ddl and role to log what the owner does past the doors"
            ),
            (None, _) => "UNWATCHED: pgaudit is not loaded, so what the owner does past the doors (DISABLE TRIGGER on the audit) leaves no trace outside the database".to_owned(),
        };
        let door = if self.owner_is_door {
            "; it HOLDS the door role (a migration window is open or was left open: the role administrator revokes it)"
        } else {
            "; not a member of the door role"
        };
        format!("database owner {}: {watch}{door}", self.owner)
    }
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
    fn an_owner_is_watched_only_where_pgaudit_logs_ddl_and_role_changes() {
        let watch = |log: Option<&str>, owner_is_door| OwnerWatch {
            owner: "pii_vault".into(),
            pgaudit_log: log.map(str::to_owned),
            owner_is_door,
        };
        assert!(watch(Some("ddl, role, misc_set"), false).watched());
        assert!(watch(Some("ALL"), false).watched());
        assert!(!watch(Some("ddl"), false).watched());
        assert!(!watch(Some(""), false).watched());
        let missing = watch(None, false).describe();
        assert!(
            missing.contains("UNWATCHED: pgaudit is not loaded"),
            "{missing}"
        );
        let open = watch(Some("ddl,role"), true).describe();
        assert!(open.starts_with("database owner pii_vault: watched by pgaudit (ddl,role)"));
        assert!(open.contains("HOLDS the door role"), "{open}");
    }

    #[test]
    fn migrations_are_embedded() {
        assert!(MIGRATOR.iter().count() >= 1);
    }
}
