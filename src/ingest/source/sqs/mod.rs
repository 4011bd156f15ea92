//! SQS as a message source, in either of its protocols.

pub mod json;
pub mod original;
pub mod query;
