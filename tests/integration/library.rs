//! The library over PostgreSQL with KMS in memory (`pii_vault::testing`): the key table, the
//! pipeline and both rotations called in-process, each on a scratch database of its own. They
//! need the database server, so they live here and not among the library's unit tests, which
//! need no service (`make test-unit`).

use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use pii_vault::ingest::source::file::FileSource;
use pii_vault::ingest::{self, Settings, Summary};
use pii_vault::testing::{MemoryKms, Scratch, TEST_KMS_KEY};
use pii_vault::vault::keyring::Keyring;
use pii_vault::vault::kms::KeyWrapper;

/// `ingest --from-file` of the 100 sample messages (99 logins, 1 malformed), in-process,
/// with a file's `settings`, until the file is read.
async fn ingest_sample<W: KeyWrapper>(
    pool: &PgPool,
    keyring: Keyring<W>,
    settings: Settings,
) -> Summary {
    const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/sample_data.jsonl");
    let source = Arc::new(FileSource::open(SAMPLE, Some("unit")).unwrap());
    let settings = Settings {
        drain: true,
        ..settings
    };
    ingest::run(
        source,
        pool.clone(),
        keyring,
        settings,
        Arc::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

mod pipeline {
    use super::*;

    /// The whole pipeline over PostgreSQL with KMS in memory. KMS throttles the token key's
    /// unwrap: loading waits it out. Then it throttles the data key's creation: the batch is
    /// not sealed, nothing of it is acknowledged, and `/readyz` says why; the file read again
    /// is stored whole.
    #[tokio::test]
    async fn kms_throttling_delays_or_leaves_messages_and_loses_none() {
        let db = Scratch::new().await;
        let kms = Arc::new(MemoryKms::new());
        let keyring = || Keyring::new(db.pool.clone(), kms.clone(), TEST_KMS_KEY, "test");
        keyring().init_token_key().await.unwrap();

        kms.throttle_next("Decrypt", 3);
        kms.throttle_next("GenerateDataKey", 1);
        let first = Settings::for_file();
        let summary = ingest_sample(&db.pool, keyring(), first.clone()).await;
        assert_eq!(
            kms.calls("Decrypt"),
            3 + 1,
            "the token key, asked until it passed"
        );
        assert_eq!(
            (
                summary.stored,
                summary.quarantined,
                summary.acknowledged,
                summary.left_on_queue
            ),
            (0, 0, 0, 100),
            "{summary}"
        );
        let why = first.sealing.get().expect("readiness names the stop");
        assert!(why.contains("sealing stopped"), "{why}");

        let summary = ingest_sample(&db.pool, keyring(), Settings::for_file()).await;
        assert_eq!((summary.stored, summary.quarantined), (99, 1), "{summary}");
        assert_eq!(
            kms.calls("GenerateDataKey"),
            1 + 1 + 1,
            "init, refused, made"
        );
        let (logins, sealed): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM user_logins), (SELECT count(*) FROM login_vault)",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!((logins, sealed), (99, 99));
        db.drop().await;
    }
}

mod rotate {
    use std::time::Duration;

    use super::*;
    use pii_vault::lifecycle::{Options, replace_keys};
    use pii_vault::unmask::{Verified, verify_all};
    use pii_vault::vault::{KeyId, Purpose};

    /// Both rotations over PostgreSQL with KMS in memory, as the key admin: every sealed value
    /// re-sealed and every token recomputed, the old keys retired and destroyed, and what is
    /// stored still opens and matches its tokens.
    #[tokio::test]
    async fn rotations_rewrite_every_row_and_destroy_the_old_keys() {
        let db = Scratch::new().await;
        let kms = Arc::new(MemoryKms::new());
        let keyring = |pool: &PgPool| Keyring::new(pool.clone(), kms.clone(), TEST_KMS_KEY, "test");
        keyring(&db.pool).init_token_key().await.unwrap();
        let summary = ingest_sample(&db.pool, keyring(&db.pool), Settings::for_file()).await;
        assert_eq!((summary.stored, summary.quarantined), (99, 1), "{summary}");
        let keys = |purpose: &'static str| {
            let pool = db.pool.clone();
            async move {
                sqlx::query_as::<_, (KeyId, String)>(
                    "SELECT id, state FROM vault_keys WHERE purpose = $1 ORDER BY id",
                )
                .bind(purpose)
                .fetch_all(&pool)
                .await
                .unwrap()
            }
        };
        let [(old_data_key, _)] = keys("data").await[..] else {
            panic!("one data key sealed the file");
        };
        let [(old_token_key, _)] = keys("token").await[..] else {
            panic!("one token key");
        };

        let admin = db.pool_as("keyadmin").await;
        let options = Options {
            grace: Duration::ZERO,
            destroy_retired: true,
            ..Options::default()
        };
        let report = replace_keys(Purpose::Data, &admin, &keyring(&admin), &options, &())
            .await
            .unwrap();
        assert_eq!(
            report.rows_rewritten,
            99 + 1,
            "logins and the quarantined body"
        );
        assert_eq!((report.retired, report.destroyed), (vec![old_data_key], 1));
        let report = replace_keys(Purpose::Token, &admin, &keyring(&admin), &options, &())
            .await
            .unwrap();
        assert_eq!(report.rows_rewritten, 99);
        assert_eq!((report.retired, report.destroyed), (vec![old_token_key], 1));

        let states =
            |keys: Vec<(KeyId, String)>| keys.into_iter().map(|(_, s)| s).collect::<Vec<_>>();
        assert_eq!(states(keys("data").await), ["destroyed", "active"]);
        assert_eq!(states(keys("token").await), ["destroyed", "active"]);
        let verified = verify_all(&admin, &keyring(&admin)).await.unwrap();
        assert_eq!(
            verified,
            Verified {
                logins: 99,
                bodies: 1
            }
        );
        admin.close().await;
        db.drop().await;
    }
}

mod keyring {
    use super::*;
    use pii_vault::vault::KeyId;
    use pii_vault::vault::keyring::{KeyringError, TokenKeyInit};
    use pii_vault::vault::place::login_place;
    use pii_vault::vault::token::Field;

    fn keyring(db: &Scratch) -> (Keyring<MemoryKms>, Arc<MemoryKms>) {
        let kms = Arc::new(MemoryKms::new());
        (
            Keyring::new(db.pool.clone(), kms.clone(), TEST_KMS_KEY, "test"),
            kms,
        )
    }

    #[tokio::test]
    async fn keys_are_stored_wrapped_and_open_only_as_what_they_were_made_for() {
        let db = Scratch::new().await;
        let (keyring, kms) = keyring(&db);
        assert!(matches!(
            keyring.active_tokenizer().await,
            Err(KeyringError::NoTokenKey)
        ));
        let TokenKeyInit::Created(token_key) = keyring.init_token_key().await.unwrap() else {
            panic!("a first init creates the token key");
        };
        assert_eq!(
            keyring.init_token_key().await.unwrap(),
            TokenKeyInit::AlreadyActive(token_key)
        );
        assert_eq!(kms.calls("GenerateDataKey"), 1);

        // A data key seals before use and opens again from its stored wrapped bytes.
        let sealer = keyring.new_sealer().await.unwrap();
        let place = login_place(Field::Ip, "m-1", "u-1");
        let sealed = sealer.seal(&place, b"10.0.0.1");
        let reopened = keyring.sealer(sealer.key_id()).await.unwrap();
        assert_eq!(
            reopened.open(&place, &sealed).unwrap().as_slice(),
            b"10.0.0.1"
        );
        let stored: Vec<u8> =
            sqlx::query_scalar("SELECT wrapped_key FROM vault_keys WHERE id = $1")
                .bind(sealer.key_id())
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(
            stored.len(),
            12 + 32 + 16,
            "nonce, wrapped key, tag: never the key alone"
        );

        // Asked for as the other purpose, a key is refused by the table before KMS is asked.
        let decrypts = kms.calls("Decrypt");
        assert!(matches!(
            keyring.tokenizer(sealer.key_id()).await,
            Err(KeyringError::WrongPurpose { .. })
        ));
        assert!(matches!(
            keyring.sealer(token_key).await,
            Err(KeyringError::WrongPurpose { .. })
        ));
        assert_eq!(kms.calls("Decrypt"), decrypts);
        assert!(matches!(
            keyring.sealer(KeyId(999)).await,
            Err(KeyringError::NotFound(KeyId(999)))
        ));
        db.drop().await;
    }

    #[tokio::test]
    async fn rewrapped_keys_open_under_the_new_kms_key_alone() {
        let db = Scratch::new().await;
        let (keyring, kms) = keyring(&db);
        keyring.init_token_key().await.unwrap();
        keyring.check_ready().await.unwrap();
        let sealer = keyring.new_sealer().await.unwrap();
        let place = login_place(Field::DeviceId, "m-1", "u-1");
        let sealed = sealer.seal(&place, b"d-1");

        let next = kms.create_key("alias/next");
        assert_eq!(
            keyring.rewrap(sealer.key_id(), "alias/next").await.unwrap(),
            next
        );
        kms.disable(TEST_KMS_KEY);
        let reopened = keyring.sealer(sealer.key_id()).await.unwrap();
        assert_eq!(reopened.open(&place, &sealed).unwrap().as_slice(), b"d-1");

        // New keys are still made under the default KMS key, now disabled: refused, for good.
        let error = keyring.check_ready().await.unwrap_err();
        assert!(matches!(error, KeyringError::WrappingKey(_)), "{error:?}");
        let error = keyring.new_sealer().await.unwrap_err();
        assert!(
            matches!(error, KeyringError::Kms { .. }) && !error.is_transient(),
            "{error:?}"
        );
        db.drop().await;
    }
}
