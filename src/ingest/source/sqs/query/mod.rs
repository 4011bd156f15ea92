//! SQS over the Query protocol.

mod client;

pub use client::*;
