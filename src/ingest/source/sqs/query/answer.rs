//! Reading the Query protocol's XML answers: a service error and whether retrying can cure
//! it, a queue URL, and the attributes of a message or a queue.

use crate::aws_http::xml;
use crate::ingest::source::SourceError;
use crate::ingest::source::sqs::is_permanent;

/// A failure of `operation`, said in one line.
pub(super) fn failure(operation: &str, why: String, transient: bool) -> SourceError {
    SourceError {
        message: format!("{operation}: {why}"),
        transient,
    }
}

/// `<ErrorResponse><Error><Code>` (AWS, LocalStack, moto, ElasticMQ) or
/// `<Response><Errors><Error>` (some older emulators), whatever the HTTP status said.
pub(super) fn is_error(root: &xml::Element) -> bool {
    root.name == "ErrorResponse" || root.child("Errors").is_some()
}

/// An error answer as a [`SourceError`]: transient if throttled or a fault of the server,
/// not if its code says retrying cannot help ([`is_permanent`]).
pub(super) fn service_error(operation: &str, status: u16, root: &xml::Element) -> SourceError {
    let error = root.find("Error");
    let code = error.map(|e| e.child_text("Code")).unwrap_or_default();
    // The service's own words (e.g. "The specified queue does not exist for this wsdl
    // version."), cut short: they describe the request, not a message's contents.
    let message: String = error
        .map(|e| e.child_text("Message"))
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    let throttled = ["Throttl", "RequestThrottled", "OverLimit", "SlowDown"]
        .iter()
        .any(|t| code.contains(t));
    let transient = if code.is_empty() {
        status >= 500 || status == 429
    } else {
        throttled || !is_permanent(code)
    };
    let what = if code.is_empty() { "an error" } else { code };
    SourceError {
        message: format!(
            "{operation}: {what} (HTTP {status}) {}",
            message.replace('\n', " ")
        )
        .trim_end()
        .to_owned(),
        transient,
    }
}

/// The `<QueueUrl>` of a GetQueueUrl or CreateQueue answer.
pub(super) fn queue_url_in(operation: &str, answer: &xml::Element) -> Result<String, SourceError> {
    match answer.find("QueueUrl").map(|u| u.text.trim()) {
        Some(url) if !url.is_empty() => Ok(url.to_owned()),
        _ => Err(failure(operation, "no URL in the answer".into(), false)),
    }
}

/// `<Attribute><Name>name</Name><Value>...</Value></Attribute>`: a system attribute's value
/// (of a message, or of the queue in a GetQueueAttributes answer).
pub(super) fn system_attribute<'a>(message: &'a xml::Element, name: &str) -> Option<&'a str> {
    message
        .children("Attribute")
        .find(|a| a.child_text("Name") == name)
        .map(|a| a.child_text("Value"))
}

/// `<MessageAttribute><Name>name</Name><Value><StringValue>...</StringValue>...`: a message
/// attribute's string value (`String` and `Number` attributes carry one).
pub(super) fn message_attribute<'a>(message: &'a xml::Element, name: &str) -> Option<&'a str> {
    message
        .children("MessageAttribute")
        .find(|a| a.child_text("Name") == name)?
        .child("Value")?
        .child("StringValue")
        .map(|value| value.text.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_transient_unless_retrying_cannot_help() {
        let error = |status, code: &str| {
            let document = format!(
                "<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>\
                 <Message>why</Message></Error></ErrorResponse>"
            );
            service_error("Op", status, &xml::parse(document.as_bytes()).unwrap())
        };
        let missing = error(400, "AWS.SimpleQueueService.NonExistentQueue");
        assert!(!missing.transient);
        assert_eq!(
            missing.message,
            "Op: AWS.SimpleQueueService.NonExistentQueue (HTTP 400) why"
        );
        assert!(!error(400, "QueueDoesNotExist").transient);
        assert!(!error(403, "InvalidClientTokenId").transient);
        assert!(!error(403, "SignatureDoesNotMatch").transient);
        assert!(error(503, "RequestThrottled").transient);
        assert!(error(400, "ThrottlingException").transient);
        assert!(error(500, "InternalError").transient);
        let no_code = xml::parse(b"<html><body>Bad Gateway</body></html>").unwrap();
        assert!(service_error("Op", 502, &no_code).transient);
        assert!(!service_error("Op", 404, &no_code).transient);
    }
}
