//! The file source's line reader on arbitrary bytes, plain and through gzip: never panics,
//! never holds more than its bound, and agrees with a plain split on `\n`.
#![no_main]

use std::io::BufReader;

use libfuzzer_sys::fuzz_target;
use pii_vault::ingest::source::file::LineReader;

/// Small, so that the fuzzer reaches the cut often.
const LIMIT: usize = 16;

fuzz_target!(|data: &[u8]| {
    // Plain: compare with the obvious reference.
    let mut expected: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    if data.is_empty() || data.ends_with(b"\n") {
        expected.pop();
    }
    let mut lines = LineReader::with_limit(BufReader::with_capacity(7, data), LIMIT);
    let mut number = 0;
    while let Some(line) = lines.next_line().unwrap() {
        let whole = expected[number];
        number += 1;
        assert_eq!(line.number, number as u64);
        assert!(line.bytes.len() <= LIMIT && !line.bytes.contains(&b'\n'));
        match line.truncated_from {
            Some(total) => {
                assert_eq!(total, whole.len() as u64);
                assert_eq!(line.bytes, &whole[..LIMIT]);
            }
            None => {
                let mut trimmed = whole;
                while let [rest @ .., b'\r'] = trimmed {
                    trimmed = rest;
                }
                assert_eq!(line.bytes, trimmed);
            }
        }
        assert!(lines.held_capacity() <= LIMIT);
    }
    assert_eq!(number, expected.len());

    // The same bytes as a gzip stream (as a `.gz` file is read): errors are fine, panics and
    // unbounded holding are not.
    let gz = flate2::read::MultiGzDecoder::new(data);
    let mut lines = LineReader::with_limit(BufReader::new(gz), LIMIT);
    for _ in 0..10_000 {
        match lines.next_line() {
            Ok(Some(line)) => assert!(line.bytes.len() <= LIMIT),
            Ok(None) | Err(_) => break,
        }
        assert!(lines.held_capacity() <= LIMIT);
    }
});
