//! Key wrapping: the [`KeyWrapper`] trait and its AWS KMS implementation.
//!
//! KMS is called once per key (to create it, or to unwrap it when a process starts), never per
//! record. Every call carries the key's [`EncryptionContext`], which KMS authenticates: a
//! wrapped key unwraps only under the purpose and id it was created for, and KMS key policies
//! can grant each role exactly the purposes it needs (see `keys/`).
//!
//! Tests and benches run the vault's logic on `memory::MemoryKms` (`src/vault/kms/memory.rs`,
//! built only for them: the `testing` feature), which keeps the rules of KMS the vault relies
//! on; every path over AWS's wire is tested against the emulator.

#[cfg(any(test, feature = "testing"))]
pub mod memory;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{DataKeySpec, KeyState};

use super::{EncryptionContext, SecretKey, WrappedKey};

/// Creates and unwraps keys: [`AwsKms`] in production, `memory::MemoryKms` in tests.
pub trait KeyWrapper: Send + Sync + 'static {
    /// A fresh 256-bit key, in plaintext and wrapped under `kms_key_id` with `context`.
    fn generate_key(
        &self,
        kms_key_id: &str,
        context: EncryptionContext,
    ) -> impl Future<Output = Result<(SecretKey, WrappedKey), KmsError>> + Send;

    /// Unwraps a stored key; fails unless `context` is the one it was wrapped with.
    fn unwrap_key(
        &self,
        wrapped: &WrappedKey,
        context: EncryptionContext,
    ) -> impl Future<Output = Result<SecretKey, KmsError>> + Send;

    /// Re-wraps a stored key under another KMS key, same context, without the plaintext key
    /// ever leaving KMS (ReEncrypt).
    fn rewrap_key(
        &self,
        wrapped: &WrappedKey,
        context: EncryptionContext,
        new_kms_key_id: &str,
    ) -> impl Future<Output = Result<WrappedKey, KmsError>> + Send;

    /// Succeeds when `kms_key_id` exists, is enabled, and this process may use it: the
    /// readiness check of a process that will create keys under it. Answers the key's ARN, as
    /// KMS names it in what it wraps (an alias or key id resolved).
    fn check_key(&self, kms_key_id: &str) -> impl Future<Output = Result<String, KmsError>> + Send;

    /// Schedules `kms_key_id` for deletion after the shortest waiting period KMS allows (7
    /// days); KMS refuses to use it from the moment it is scheduled, so whatever it wrapped,
    /// in every copy, can no longer be unwrapped. Done already if it is pending deletion.
    fn schedule_deletion(
        &self,
        kms_key_id: &str,
    ) -> impl Future<Output = Result<(), KmsError>> + Send;
}

/// A KMS failure. The text comes from KMS and the SDK and never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// Throttling, a network failure or a KMS-side fault: worth retrying later.
    #[error("KMS unavailable: {0}")]
    Unavailable(String),
    /// KMS refused: access denied, unknown or disabled key, or a wrapped key that does not match
    /// its encryption context (altered, moved, or wrapped for another purpose).
    #[error("KMS refused {operation}: {message}")]
    Refused {
        operation: &'static str,
        /// The KMS error code, e.g. `AccessDeniedException` or `InvalidCiphertextException`.
        code: String,
        message: String,
    },
    /// KMS answered without the data it must return.
    #[error("KMS returned an unusable response to {0}")]
    BadResponse(&'static str),
}

impl KmsError {
    pub fn is_transient(&self) -> bool {
        matches!(self, KmsError::Unavailable(_))
    }

    /// KMS said this caller may not use the key (as opposed to: the wrapped key is bad).
    pub fn is_access_denied(&self) -> bool {
        matches!(self, KmsError::Refused { code, .. } if code == "AccessDeniedException")
    }

    fn from_sdk<E, R>(operation: &'static str, error: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug,
    {
        let transient_codes = [
            "ThrottlingException",
            "KMSInternalException",
            "DependencyTimeoutException",
            "KeyUnavailableException",
        ];
        let code = match &error {
            SdkError::ServiceError(service) => service.err().code().map(str::to_owned),
            _ => None,
        };
        let message = crate::aws_error::one_line(&error);
        match code {
            Some(code) if !transient_codes.contains(&code.as_str()) => KmsError::Refused {
                operation,
                code,
                message,
            },
            // Throttling and KMS-side faults, timeouts, connection failures.
            _ => KmsError::Unavailable(format!("{operation}: {message}")),
        }
    }
}

/// AWS KMS over the SDK; counts its calls so tests and benchmarks can hold it to "once per key".
#[derive(Debug)]
pub struct AwsKms {
    client: aws_sdk_kms::Client,
    calls: AtomicU64,
}

impl AwsKms {
    pub fn new(client: aws_sdk_kms::Client) -> Self {
        Self {
            client,
            calls: AtomicU64::new(0),
        }
    }

    pub fn from_conf(config: &aws_config::SdkConfig) -> Self {
        Self::new(aws_sdk_kms::Client::new(config))
    }

    /// KMS requests made so far (each one an SDK operation, whatever its retries).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn count(&self, operation: &'static str) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::KMS_CALLS, "operation" => operation).increment(1);
    }

    pub fn client(&self) -> &aws_sdk_kms::Client {
        &self.client
    }
}

impl KeyWrapper for AwsKms {
    async fn generate_key(
        &self,
        kms_key_id: &str,
        context: EncryptionContext,
    ) -> Result<(SecretKey, WrappedKey), KmsError> {
        self.count("GenerateDataKey");
        let mut output = self
            .client
            .generate_data_key()
            .key_id(kms_key_id)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(context.to_map()))
            .send()
            .await
            .map_err(|e| KmsError::from_sdk("GenerateDataKey", e))?;
        let mut plaintext = output
            .plaintext
            .take()
            .ok_or(KmsError::BadResponse("GenerateDataKey"))?
            .into_inner();
        let key = SecretKey::take_from(&mut plaintext)
            .map_err(|_| KmsError::BadResponse("GenerateDataKey"))?;
        let wrapped = WrappedKey {
            ciphertext: output
                .ciphertext_blob
                .take()
                .ok_or(KmsError::BadResponse("GenerateDataKey"))?
                .into_inner(),
            kms_key_id: output
                .key_id
                .take()
                .unwrap_or_else(|| kms_key_id.to_owned()),
        };
        Ok((key, wrapped))
    }

    async fn unwrap_key(
        &self,
        wrapped: &WrappedKey,
        context: EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        self.count("Decrypt");
        let mut output = self
            .client
            .decrypt()
            .key_id(&wrapped.kms_key_id)
            .ciphertext_blob(Blob::new(wrapped.ciphertext.clone()))
            .set_encryption_context(Some(context.to_map()))
            .send()
            .await
            .map_err(|e| KmsError::from_sdk("Decrypt", e))?;
        let mut plaintext = output
            .plaintext
            .take()
            .ok_or(KmsError::BadResponse("Decrypt"))?
            .into_inner();
        SecretKey::take_from(&mut plaintext).map_err(|_| KmsError::BadResponse("Decrypt"))
    }

    async fn rewrap_key(
        &self,
        wrapped: &WrappedKey,
        context: EncryptionContext,
        new_kms_key_id: &str,
    ) -> Result<WrappedKey, KmsError> {
        self.count("ReEncrypt");
        let mut output = self
            .client
            .re_encrypt()
            .source_key_id(&wrapped.kms_key_id)
            .ciphertext_blob(Blob::new(wrapped.ciphertext.clone()))
            .set_source_encryption_context(Some(context.to_map()))
            .destination_key_id(new_kms_key_id)
            .set_destination_encryption_context(Some(context.to_map()))
            .send()
            .await
            .map_err(|e| KmsError::from_sdk("ReEncrypt", e))?;
        Ok(WrappedKey {
            ciphertext: output
                .ciphertext_blob
                .take()
                .ok_or(KmsError::BadResponse("ReEncrypt"))?
                .into_inner(),
            kms_key_id: output
                .key_id
                .take()
                .unwrap_or_else(|| new_kms_key_id.to_owned()),
        })
    }

    async fn schedule_deletion(&self, kms_key_id: &str) -> Result<(), KmsError> {
        self.count("DescribeKey");
        let state = self
            .client
            .describe_key()
            .key_id(kms_key_id)
            .send()
            .await
            .map_err(|e| KmsError::from_sdk("DescribeKey", e))?
            .key_metadata
            .and_then(|metadata| metadata.key_state);
        if state == Some(KeyState::PendingDeletion) {
            return Ok(());
        }
        self.count("ScheduleKeyDeletion");
        self.client
            .schedule_key_deletion()
            .key_id(kms_key_id)
            .pending_window_in_days(7)
            .send()
            .await
            .map_err(|e| KmsError::from_sdk("ScheduleKeyDeletion", e))?;
        Ok(())
    }

    async fn check_key(&self, kms_key_id: &str) -> Result<String, KmsError> {
        self.count("DescribeKey");
        let output = self
            .client
            .describe_key()
            .key_id(kms_key_id)
            .send()
            .await
            .map_err(|e| KmsError::from_sdk("DescribeKey", e))?;
        let metadata = output
            .key_metadata
            .ok_or(KmsError::BadResponse("DescribeKey"))?;
        let (Some(state), Some(arn)) = (metadata.key_state, metadata.arn) else {
            return Err(KmsError::BadResponse("DescribeKey"));
        };
        if state != KeyState::Enabled {
            return Err(KmsError::Refused {
                operation: "DescribeKey",
                code: "KeyNotEnabled".into(),
                message: format!("the key is {}", state.as_str()),
            });
        }
        Ok(arn)
    }
}
