//! The test kit, for this crate's tests and benches (the `testing` feature, which release builds
//! leave off, so production binaries never hold it): [`Scratch`], a database of one's own on the
//! PostgreSQL server `scripts/services up` runs, and [`MemoryKms`], the in-memory KMS (kept in
//! `src/vault/kms/memory.rs`, with the rest of the code that handles key material).
//!
//! A missing service is a loud failure naming the command that starts it.

use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::db;

pub use crate::vault::kms::memory::{MemoryKms, TEST_KMS_KEY};

/// The server tests make their databases on: `DATABASE_URL`, else the local one.
pub fn base_database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| db::LOCAL_DATABASE_URL.to_owned())
}

/// The role administrator that opens migration windows (`db::migrate_with`):
/// `ROLE_ADMIN_DATABASE_URL`, else the local one.
pub fn role_admin_url() -> String {
    std::env::var("ROLE_ADMIN_DATABASE_URL").unwrap_or_else(|_| db::LOCAL_ROLE_ADMIN_URL.to_owned())
}

/// The role administrator, logged in.
pub async fn role_admin() -> PgPool {
    db::connect(&role_admin_url(), 1).await.unwrap_or_else(|e| {
        panic!("the role administrator cannot log in ({e}); run `scripts/services up`")
    })
}

/// A short random suffix for names of per-test resources.
pub fn unique_suffix() -> String {
    format!(
        "{:012x}",
        RandomState::new().hash_one(Instant::now()) & 0xffff_ffff_ffff
    )
}

/// A database of its own (`pii_vault_test_*`) on the server at [`base_database_url`], so tests
/// run in parallel without seeing each other; dropped by [`Scratch::drop`] (left in place when
/// a test fails, for inspection).
pub struct Scratch {
    /// Logged in as the server's user, the database's owner.
    pub pool: PgPool,
    pub database_url: String,
    pub database_name: String,
}

impl Scratch {
    /// A fresh database, migrated.
    pub async fn new() -> Self {
        Self::create(true).await
    }

    /// An empty database, as before `rotate-keys init` (or before a restore).
    pub async fn empty() -> Self {
        Self::create(false).await
    }

    async fn create(migrated: bool) -> Self {
        let base = base_database_url();
        let admin = db::connect(&base, 1).await.unwrap_or_else(|e| {
            panic!("PostgreSQL is not reachable ({e}); start it with `scripts/services up`")
        });
        let database_name = format!("pii_vault_test_{}", unique_suffix());
        if migrated {
            let role_admin = role_admin().await;
            template::create_migrated(&base, &database_name, &role_admin)
                .await
                .expect(
                    "creating the test database (the role needs CREATEDB; see scripts/services)",
                );
            role_admin.close().await;
        } else {
            sqlx::query(&format!("CREATE DATABASE {database_name}"))
                .execute(&admin)
                .await
                .expect(
                    "creating the test database (the role needs CREATEDB; see scripts/services)",
                );
        }
        admin.close().await;
        let (prefix, _) = base.rsplit_once('/').expect("database URL ends in /name");
        let database_url = format!("{prefix}/{database_name}");
        let pool = db::connect(&database_url, 8)
            .await
            .expect("connecting to the test database");
        Self {
            pool,
            database_url,
            database_name,
        }
    }

    /// This database's URL, logged in as one of the local users that `scripts/services up`
    /// creates (`ingester`, `analyst`, `compliance`, `keyadmin`, and `nobody`, who holds no
    /// role; password = name).
    pub fn url_as(&self, user: &str) -> String {
        let (_, host_and_db) = self
            .database_url
            .rsplit_once('@')
            .expect("URL has credentials");
        format!("postgres://{user}:{user}@{host_and_db}")
    }

    /// A pool logged in as one of those users (see [`Scratch::url_as`]).
    pub async fn pool_as(&self, user: &str) -> PgPool {
        db::connect(&self.url_as(user), 4)
            .await
            .unwrap_or_else(|e| panic!("connecting as {user} ({e}): run `scripts/services up`"))
    }

    /// Drops the database.
    pub async fn drop(self) {
        self.pool.close().await;
        let admin = db::connect(&base_database_url(), 1).await.unwrap();
        let drop = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.database_name
        );
        // A binary that ran as another login user may still be leaving the server; FORCE
        // cannot end its session (that takes membership in its role), so wait for it.
        let mut tries = 0;
        while let Err(error) = sqlx::query(&drop).execute(&admin).await {
            tries += 1;
            if tries == 100 {
                // Seen under load: a session of another login outlives its pool's close() by
                // more than ten seconds. The role administrator (pg_signal_backend) ends it,
                // as an operator would, and says so.
                let role_admin = role_admin().await;
                let ended: i64 = sqlx::query_scalar(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
                     FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                )
                .bind(&self.database_name)
                .fetch_one(&role_admin)
                .await
                .unwrap_or(0);
                role_admin.close().await;
                eprintln!(
                    "cleanup: ended {ended} session(s) left in {}",
                    self.database_name
                );
            }
            if tries == 300 {
                let sessions: Vec<(Option<String>, Option<String>, Option<String>)> =
                    sqlx::query_as(
                        "SELECT usename::text, state, left(query, 200) FROM pg_stat_activity
                         WHERE datname = $1",
                    )
                    .bind(&self.database_name)
                    .fetch_all(&admin)
                    .await
                    .unwrap_or_default();
                panic!("dropping the test database: {error}; sessions left: {sessions:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        admin.close().await;
    }
}

/// Databases made migrated, for tests and benches: each makes databases by the dozen, and
/// migrating each would cost time, a migration window each (serialized), and pgaudit's log
/// of every DDL statement with its whole migration file. They clone one migrated template
/// instead, made once per set of migrations (its name carries their checksums) and kept.
mod template {
    use std::time::Duration;

    use sha2::{Digest, Sha256};
    use sqlx::{PgConnection, PgPool};
    use tokio::sync::Mutex;

    use crate::db::{DbError, MIGRATOR, check_schema, connect, migrate};

    /// Serializes making the template across processes.
    const TEMPLATE_LOCK: i64 = 8_100_121_361_964_690_550;

    /// Creates database `name` as `base_url`'s user (CREATEDB), migrated as by [`migrate`].
    pub async fn create_migrated(
        base_url: &str,
        name: &str,
        role_admin: &PgPool,
    ) -> Result<(), DbError> {
        // The template this process made; made again if a process working on other migrations
        // (another branch's tests on the same server) dropped it as stale meanwhile.
        static TEMPLATE: Mutex<Option<String>> = Mutex::const_new(None);
        let mut attempts = 0;
        loop {
            let template = {
                let mut made = TEMPLATE.lock().await;
                match made.as_ref() {
                    Some(template) => template.clone(),
                    None => made
                        .insert(make_template(base_url, role_admin).await?)
                        .clone(),
                }
            };
            let admin = connect(base_url, 1).await?;
            let cloned = clone(&admin, name, &template).await;
            admin.close().await;
            match cloned {
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some("3D000") && attempts < 5 =>
                {
                    attempts += 1;
                    TEMPLATE.lock().await.take_if(|made| *made == template);
                }
                other => return Ok(other?),
            }
        }
    }

    async fn clone(admin: &PgPool, name: &str, template: &str) -> Result<(), sqlx::Error> {
        // Cloning fails while another session is connected to the template (another process
        // checking it): wait for it.
        let mut tries = 0;
        let created = loop {
            match sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
                .execute(admin)
                .await
            {
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some("55006") && tries < 100 =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => break other,
            }
        };
        created.map(drop)
    }

    async fn make_template(base_url: &str, role_admin: &PgPool) -> Result<String, DbError> {
        let mut digest = Sha256::new();
        for migration in MIGRATOR.iter() {
            digest.update(migration.version.to_be_bytes());
            digest.update(&migration.checksum);
        }
        let name = format!(
            "pii_vault_template_{}",
            &hex::encode(digest.finalize())[..16]
        );
        let admin = connect(base_url, 1).await?;
        let mut lock = admin.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(TEMPLATE_LOCK)
            .execute(&mut *lock)
            .await?;
        let made = make_unless_current(&mut lock, base_url, &name, role_admin).await;
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(TEMPLATE_LOCK)
            .execute(&mut *lock)
            .await?;
        drop(lock);
        admin.close().await;
        made.map(|()| name)
    }

    async fn make_unless_current(
        conn: &mut PgConnection,
        base_url: &str,
        name: &str,
        role_admin: &PgPool,
    ) -> Result<(), DbError> {
        let (prefix, _) = base_url.rsplit_once('/').unwrap_or((base_url, ""));
        let url = format!("{prefix}/{name}");
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(name)
                .fetch_one(&mut *conn)
                .await?;
        if exists {
            let pool = connect(&url, 1).await?;
            let current = check_schema(&pool).await;
            pool.close().await;
            if current.is_ok() {
                return Ok(());
            }
            // Left half-made by a process that died while migrating it.
            sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
                .execute(&mut *conn)
                .await?;
        }
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut *conn)
            .await?;
        let pool = connect(&url, 2).await?;
        let migrated = migrate(&pool, Some(role_admin)).await;
        pool.close().await;
        migrated?;
        // Templates of older migrations are of no more use.
        let stale: Vec<String> = sqlx::query_scalar(
            "SELECT datname::text FROM pg_database
             WHERE datname LIKE 'pii\\_vault\\_template\\_%' AND datname <> $1",
        )
        .bind(name)
        .fetch_all(&mut *conn)
        .await?;
        for old in stale {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {old}"))
                .execute(&mut *conn)
                .await;
        }
        Ok(())
    }
}
