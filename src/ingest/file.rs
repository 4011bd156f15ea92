//! A file as a message source, for backfills and replays: one message per line (JSON lines,
//! gzip-compressed if the name ends in `.gz`, or `-` for stdin).
//!
//! Each line's message id is `<source id>:<line number>`, stable across runs, so replaying the
//! same file adds nothing (`ON CONFLICT (message_id)`). The source id defaults to the file's
//! absolute path; give the same `--source-id` to replay a file that moved. Lines are read on
//! a thread of their own, a bounded number of chunks ahead, so memory stays flat whatever the
//! file's size. Acknowledging is a no-op: a file has nothing to delete.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::mpsc;

use super::source::{Acknowledged, Message, MessageSource, Receipt, SourceError};

/// Lines per chunk handed to the pipeline.
const CHUNK_LINES: usize = 500;
/// Chunks read ahead of the pipeline.
const CHUNKS_AHEAD: usize = 4;

pub struct FileSource {
    chunks: tokio::sync::Mutex<mpsc::Receiver<Result<Vec<Message>, String>>>,
    failed: Mutex<Option<String>>,
}

impl FileSource {
    /// Starts reading `path` (`-` for stdin).
    pub fn open(path: &str, source_id: Option<&str>) -> std::io::Result<Self> {
        let (reader, default_id): (Box<dyn Read + Send>, String) = if path == "-" {
            (Box::new(std::io::stdin()), "stdin".to_owned())
        } else {
            let file = std::fs::File::open(path)?;
            let absolute = std::fs::canonicalize(path)?.display().to_string();
            let reader: Box<dyn Read + Send> =
                if Path::new(path).extension().is_some_and(|e| e == "gz") {
                    Box::new(flate2::read::MultiGzDecoder::new(file))
                } else {
                    Box::new(file)
                };
            (reader, absolute)
        };
        let source_id = source_id.map_or(default_id, str::to_owned);
        let (sender, receiver) = mpsc::channel(CHUNKS_AHEAD);
        std::thread::Builder::new()
            .name("file-source".into())
            .spawn(move || {
                read_lines(
                    BufReader::with_capacity(1 << 20, reader),
                    &source_id,
                    &sender,
                )
            })?;
        Ok(Self {
            chunks: tokio::sync::Mutex::new(receiver),
            failed: Mutex::new(None),
        })
    }
}

fn read_lines(
    mut reader: impl BufRead,
    source_id: &str,
    sender: &mpsc::Sender<Result<Vec<Message>, String>>,
) {
    let mut chunk = Vec::with_capacity(CHUNK_LINES);
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) => {
                let _ = sender.blocking_send(Err(format!("reading line {}: {error}", number + 1)));
                return;
            }
        }
        number += 1;
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        chunk.push(Message {
            id: format!("{source_id}:{number}"),
            body: line.clone(),
            sent_at: None,
            receipt: Receipt(String::new()),
            read_at: Instant::now(),
        });
        if chunk.len() == CHUNK_LINES
            && sender
                .blocking_send(Ok(std::mem::take(&mut chunk)))
                .is_err()
        {
            return; // the pipeline stopped
        }
    }
    if !chunk.is_empty() {
        let _ = sender.blocking_send(Ok(chunk));
    }
}

impl MessageSource for FileSource {
    async fn receive(&self) -> Result<Vec<Message>, SourceError> {
        if let Some(message) = self.failed.lock().expect("not poisoned").clone() {
            return Err(SourceError {
                message,
                transient: false,
            });
        }
        match self.chunks.lock().await.recv().await {
            Some(Ok(mut chunk)) => {
                // Latency counts from when the pipeline takes a message, not from read-ahead.
                let now = Instant::now();
                for message in &mut chunk {
                    message.read_at = now;
                }
                Ok(chunk)
            }
            Some(Err(message)) => {
                *self.failed.lock().expect("not poisoned") = Some(message.clone());
                Err(SourceError {
                    message,
                    transient: false,
                })
            }
            None => Ok(Vec::new()), // end of file
        }
    }

    async fn acknowledge(&self, receipts: Vec<Receipt>) -> Result<Acknowledged, SourceError> {
        Ok(Acknowledged {
            deleted: receipts.len(),
            refused: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_become_messages_with_stable_ids() {
        let dir = std::env::temp_dir().join(format!("pii-vault-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("in.jsonl");
        std::fs::write(&path, b"{\"a\": 1}\r\n\n  \n{\"b\": 2}\nlast").unwrap();
        let source = FileSource::open(path.to_str().unwrap(), Some("backfill")).unwrap();
        let messages = source.receive().await.unwrap();
        let ids: Vec<&str> = messages.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["backfill:1", "backfill:4", "backfill:5"]);
        assert_eq!(messages[0].body, b"{\"a\": 1}");
        assert_eq!(messages[2].body, b"last");
        assert!(source.receive().await.unwrap().is_empty(), "end of file");

        let gz = dir.join("in.jsonl.gz");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, b"x\ny\n").unwrap();
        std::fs::write(&gz, encoder.finish().unwrap()).unwrap();
        let source = FileSource::open(gz.to_str().unwrap(), None).unwrap();
        let messages = source.receive().await.unwrap();
        assert_eq!(messages.len(), 2);
        assert!(
            messages[1].id.ends_with("in.jsonl.gz:2"),
            "{}",
            messages[1].id
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
