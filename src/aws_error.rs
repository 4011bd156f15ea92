//! What an AWS SDK failure says to an operator: one line naming what to do (the region, the
//! credentials, the endpoint, the queue or key, the role), never the SDK's whole error
//! context, which goes to the debug log.

use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// One line for an SDK failure: the service's code and message with what to check, or what
/// kept the request from reaching the service.
pub fn one_line<E, R>(error: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    tracing::debug!(error = %DisplayErrorContext(error), "AWS request failed");
    match error {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("an error");
            let said = match service.err().message() {
                Some(message) => format!("{code}: {message}"),
                None => code.to_owned(),
            };
            match what_to_check(code) {
                Some(hint) => format!("{said} ({hint})"),
                None => said,
            }
        }
        SdkError::TimeoutError(_) => format!("no answer from {} in time", endpoint()),
        SdkError::DispatchFailure(failure) => match failure.as_connector_error() {
            Some(connector) => not_sent(&causes(connector)),
            None => not_sent(""),
        },
        SdkError::ResponseError(_) => format!("the answer from {} could not be read", endpoint()),
        _ => "the request could not be built".to_owned(),
    }
}

/// What to check for a service's error code.
fn what_to_check(code: &str) -> Option<&'static str> {
    let hint = match code {
        c if c.contains("NonExistentQueue") || c.contains("QueueDoesNotExist") => {
            "check the queue name or URL (QUEUE, --queue), AWS_REGION and the account"
        }
        c if c.starts_with("AccessDenied") => {
            "the role in use lacks this permission: keys/ holds the policy each role needs"
        }
        "NotFoundException" => "check the key id or alias (KMS_KEY_ID), AWS_REGION and the account",
        "DisabledException" => {
            "the KMS key is disabled: enable it, or point KMS_KEY_ID at the key in use (docs/runbook.md)"
        }
        "KMSInvalidStateException" => {
            "the KMS key is pending deletion or unusable: see docs/runbook.md before anything else"
        }
        "UnrecognizedClientException" | "InvalidClientTokenId" | "SignatureDoesNotMatch" => {
            "the credentials are not valid here: check AWS_PROFILE or AWS_ACCESS_KEY_ID and the endpoint"
        }
        "ExpiredToken" | "ExpiredTokenException" => "the credentials have expired: refresh them",
        _ => return None,
    };
    Some(hint)
}

/// Why a request never reached the service, from the text of its causes.
fn not_sent(causes: &str) -> String {
    if causes.contains("signing region") || causes.contains("no region") {
        "no AWS region: set AWS_REGION (e.g. AWS_REGION=us-east-1)".to_owned()
    } else if causes.contains("credential") {
        "no AWS credentials: set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
         (any values for an emulator), or run with a role"
            .to_owned()
    } else {
        match std::env::var("AWS_ENDPOINT_URL") {
            Ok(url) if !url.is_empty() => format!(
                "nothing answers at AWS_ENDPOINT_URL={url}: start the emulator \
                 (`scripts/services up`) or unset AWS_ENDPOINT_URL to reach AWS"
            ),
            _ => "cannot reach AWS: check the network, the proxy and AWS_REGION".to_owned(),
        }
    }
}

fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "AWS".to_owned())
}

/// Every cause's text, lowercased, in one string.
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut cause = Some(error);
    while let Some(e) = cause {
        text.push_str(&e.to_string().to_lowercase());
        text.push('\n');
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_not_sent_names_what_to_set() {
        assert!(not_sent("dispatch failure\nmissing signing region\n").contains("AWS_REGION"));
        assert!(not_sent("failed to load credentials\n").contains("AWS_ACCESS_KEY_ID"));
    }

    #[test]
    fn service_codes_name_what_to_check() {
        assert!(
            what_to_check("AWS.SimpleQueueService.NonExistentQueue")
                .unwrap()
                .contains("QUEUE")
        );
        assert!(
            what_to_check("QueueDoesNotExist")
                .unwrap()
                .contains("QUEUE")
        );
        assert!(
            what_to_check("AccessDeniedException")
                .unwrap()
                .contains("keys/")
        );
        assert!(
            what_to_check("NotFoundException")
                .unwrap()
                .contains("KMS_KEY_ID")
        );
        assert_eq!(what_to_check("ThrottlingException"), None);
    }
}
