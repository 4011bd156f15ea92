//! The body of a Query request: `application/x-www-form-urlencoded`, parameter by parameter.

use crate::aws_http;

/// The one version of the SQS Query API.
const API_VERSION: &str = "2012-11-05";

/// An `application/x-www-form-urlencoded` request body, built parameter by parameter.
pub(super) struct Form {
    pub(super) action: &'static str,
    pub(super) body: String,
}

impl Form {
    pub(super) fn new(action: &'static str) -> Self {
        let mut form = Self {
            action,
            body: String::with_capacity(256),
        };
        form.add("Action", action);
        form.add("Version", API_VERSION);
        form
    }

    /// A request about one queue, which the form names (see
    /// [`QueryClient::target`](super::client::QueryClient::target)).
    pub(super) fn for_queue(action: &'static str, queue_url: &str) -> Self {
        let mut form = Self::new(action);
        form.add("QueueUrl", queue_url);
        form
    }

    pub(super) fn add(&mut self, key: &str, value: &str) {
        if !self.body.is_empty() {
            self.body.push('&');
        }
        aws_http::percent_encode_into(&mut self.body, key);
        self.body.push('=');
        aws_http::percent_encode_into(&mut self.body, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encodes_everything_but_unreserved_characters() {
        let mut form = Form::new("SendMessageBatch");
        form.add(
            "SendMessageBatchRequestEntry.1.MessageBody",
            "{\"a\": \"é &=+\"}\r\n",
        );
        assert_eq!(
            form.body,
            "Action=SendMessageBatch&Version=2012-11-05&SendMessageBatchRequestEntry.1.MessageBody=\
             %7B%22a%22%3A%20%22%C3%A9%20%26%3D%2B%22%7D%0D%0A"
        );
    }
}
