//! A file as a message source, for backfills and replays: one message per line (JSON lines,
//! gzip-compressed if the name ends in `.gz`, or `-` for stdin).
//!
//! Each line's message id is the [`MessageKey`] of `<source id>:<line number>` in UUID form,
//! stable across runs, so replaying the same file adds nothing; it is 16 bytes in the
//! database however long the path. The source id defaults to the file's absolute path; give
//! the same `--source-id` to replay a file that moved. A line has no send time: its login is
//! dated the day its source id was first ingested, which the database keeps
//! ([`MessageSource::undated_source_key`], migration 0021), so every replay dates it the same.
//! Lines are read on a thread of their own, a bounded number of chunks ahead, so memory stays
//! flat whatever the file's size. Acknowledging is a no-op: a file has nothing to delete.
//!
//! Each line is read with a bound ([`LineReader`]): at most [`MAX_LINE_BYTES`] of it is held,
//! so one huge line, or a gzip bomb that decompresses to one, cannot exhaust memory. A longer
//! line is quarantined like an oversized SQS body (its first [`MAX_LINE_BYTES`] bytes are what
//! is kept and sealed, and a warning names its line number and full length); the rest of it is
//! skipped without being kept, and the next line is read as usual.
//!
//! How far the read is shows in [`FileSource::bytes_read`] out of [`FileSource::size`]: bytes
//! of the file itself, so compressed bytes for a `.gz`.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use super::{Acknowledged, Message, MessageKey, MessageSource, Receipt, SourceError};

/// The most of one line that is ever held: one byte over the body limit, so that the parser
/// still refuses an over-long line as too large (`MAX_BODY_BYTES` itself plus a `\r`).
pub const MAX_LINE_BYTES: usize = crate::event::MAX_BODY_BYTES + 2;

/// Lines per chunk handed to the pipeline.
const CHUNK_LINES: usize = 500;
/// Chunks read ahead of the pipeline.
const CHUNKS_AHEAD: usize = 4;

pub struct FileSource {
    chunks: tokio::sync::Mutex<mpsc::Receiver<Result<Vec<Message>, String>>>,
    failed: Mutex<Option<String>>,
    /// Bytes taken from the file (or stdin) so far, by the reading thread.
    read: Arc<AtomicU64>,
    /// The file's size, when it is a regular file.
    size: Option<u64>,
    /// The key of the source id, which every replay repeats.
    source_key: MessageKey,
}

impl FileSource {
    /// Starts reading `path` (`-` for stdin).
    pub fn open(path: &str, source_id: Option<&str>) -> std::io::Result<Self> {
        let read = Arc::new(AtomicU64::new(0));
        let (reader, default_id, size): (Box<dyn Read + Send>, String, _) = if path == "-" {
            let stdin = Counted::new(std::io::stdin(), &read);
            (Box::new(stdin), "stdin".to_owned(), None)
        } else {
            let file = std::fs::File::open(path)?;
            let metadata = file.metadata()?;
            let size = metadata.is_file().then_some(metadata.len());
            let absolute = std::fs::canonicalize(path)?.display().to_string();
            let file = Counted::new(file, &read);
            let reader: Box<dyn Read + Send> =
                if Path::new(path).extension().is_some_and(|e| e == "gz") {
                    Box::new(flate2::read::MultiGzDecoder::new(file))
                } else {
                    Box::new(file)
                };
            (reader, absolute, size)
        };
        let source_id = source_id.map_or(default_id, str::to_owned);
        let source_key = MessageKey::of(&source_id);
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
            read,
            size,
            source_key,
        })
    }

    /// Bytes read from the file so far (compressed bytes for a `.gz`); the reading runs a few
    /// chunks ahead of what is written.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// The file's size in bytes; `None` for stdin, a pipe or a device.
    pub fn size(&self) -> Option<u64> {
        self.size
    }
}

/// A reader that counts the bytes read through it.
struct Counted<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R> Counted<R> {
    fn new(inner: R, read: &Arc<AtomicU64>) -> Self {
        Self {
            inner,
            read: read.clone(),
        }
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// One line as read: its 1-based number, its bytes without the line end (at most
/// [`MAX_LINE_BYTES`]), and, when it was longer, its full length.
#[derive(Debug, PartialEq, Eq)]
pub struct Line<'a> {
    pub number: u64,
    pub bytes: &'a [u8],
    /// `Some(total bytes)` when the line was longer than [`MAX_LINE_BYTES`] and cut.
    pub truncated_from: Option<u64>,
}

/// Reads `\n`-terminated lines holding at most `max` bytes of each: the excess of a longer
/// line is consumed and counted, never kept.
pub struct LineReader<R> {
    reader: R,
    line: Vec<u8>,
    number: u64,
    max: usize,
}

impl<R: BufRead> LineReader<R> {
    pub fn new(reader: R) -> Self {
        Self::with_limit(reader, MAX_LINE_BYTES)
    }

    pub fn with_limit(reader: R, max: usize) -> Self {
        Self {
            reader,
            line: Vec::new(),
            number: 0,
            max,
        }
    }

    /// The most this reader has ever held of one line (its buffer's capacity).
    pub fn held_capacity(&self) -> usize {
        self.line.capacity()
    }

    /// The next line (`\r\n` and `\n` removed), or `None` at the end of the input.
    pub fn next_line(&mut self) -> std::io::Result<Option<Line<'_>>> {
        self.line.clear();
        let mut total = 0u64;
        let mut saw_any = false;
        loop {
            let available = match self.reader.fill_buf() {
                Ok(available) => available,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            if available.is_empty() {
                break;
            }
            saw_any = true;
            let (content, used, end) = match available.iter().position(|&b| b == b'\n') {
                Some(at) => (&available[..at], at + 1, true),
                None => (available, available.len(), false),
            };
            let take = content.len().min(self.max.saturating_sub(self.line.len()));
            if self.line.len() + take > self.line.capacity() {
                // Grow by doubling, but never past the bound.
                let want = (self.line.len() + take)
                    .max(self.line.capacity() * 2)
                    .min(self.max);
                self.line.reserve_exact(want - self.line.len());
            }
            self.line.extend_from_slice(&content[..take]);
            total += content.len() as u64;
            self.reader.consume(used);
            if end {
                break;
            }
        }
        if !saw_any {
            return Ok(None);
        }
        self.number += 1;
        let truncated_from = (total > self.line.len() as u64).then_some(total);
        while truncated_from.is_none() && self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        Ok(Some(Line {
            number: self.number,
            bytes: &self.line,
            truncated_from,
        }))
    }
}

fn read_lines(
    reader: impl BufRead,
    source_id: &str,
    sender: &mpsc::Sender<Result<Vec<Message>, String>>,
) {
    let mut chunk = Vec::with_capacity(CHUNK_LINES);
    let mut lines = LineReader::new(reader);
    loop {
        let line = match lines.next_line() {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(error) => {
                let number = lines.number + 1;
                let _ = sender.blocking_send(Err(format!("reading line {number}: {error}")));
                return;
            }
        };
        if line.bytes.iter().all(u8::is_ascii_whitespace) && line.truncated_from.is_none() {
            continue;
        }
        if let Some(total) = line.truncated_from {
            tracing::warn!(
                line = line.number,
                bytes = total,
                "line over the 256 KiB body limit: quarantined with its first {MAX_LINE_BYTES} bytes"
            );
        }
        chunk.push(Message {
            id: line_id(source_id, line.number),
            body: line.bytes.to_vec(),
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

/// A line's message id. Before migration 0008 it was the text `<source id>:<line number>`;
/// its key is the same, so a file replayed across the upgrade still adds nothing.
pub fn line_id(source_id: &str, line: u64) -> String {
    MessageKey::of(&format!("{source_id}:{line}")).to_text()
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
        })
    }

    fn undated_source_key(&self) -> Option<MessageKey> {
        Some(self.source_key)
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
        let want: Vec<String> = [1, 4, 5].map(|n| line_id("backfill", n)).into();
        assert_eq!(ids, want);
        assert_eq!(
            MessageKey::parse_canonical(ids[0]),
            Some(MessageKey::of("backfill:1")),
            "a line's id is the UUID of its pre-0008 text id"
        );
        assert_eq!(messages[0].body, b"{\"a\": 1}");
        assert_eq!(messages[2].body, b"last");
        assert!(source.receive().await.unwrap().is_empty(), "end of file");
        assert_eq!(source.size(), Some(27));
        assert_eq!(source.bytes_read(), 27, "the whole file, once read");

        let gz = dir.join("in.jsonl.gz");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, b"x\ny\n").unwrap();
        std::fs::write(&gz, encoder.finish().unwrap()).unwrap();
        let compressed = std::fs::metadata(&gz).unwrap().len();
        let source = FileSource::open(gz.to_str().unwrap(), None).unwrap();
        let messages = source.receive().await.unwrap();
        assert_eq!(messages.len(), 2);
        assert!(source.receive().await.unwrap().is_empty(), "end of file");
        assert_eq!(source.size(), Some(compressed));
        assert_eq!(
            source.bytes_read(),
            compressed,
            "a .gz counts the bytes of the file, not of what it decompresses to"
        );
        let absolute = std::fs::canonicalize(&gz).unwrap();
        let by_path = line_id(&absolute.display().to_string(), 2);
        assert_eq!(
            messages[1].id, by_path,
            "the source id defaults to the absolute path"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `len` bytes of `a`, made on demand: a huge line that costs no memory to produce.
    struct LazyLine {
        left: u64,
        then: &'static [u8],
    }

    impl Read for LazyLine {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.left > 0 {
                let n = buf
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                buf[..n].fill(b'a');
                self.left -= n as u64;
                return Ok(n);
            }
            let n = buf.len().min(self.then.len());
            buf[..n].copy_from_slice(&self.then[..n]);
            self.then = &self.then[n..];
            Ok(n)
        }
    }

    /// The process's peak resident set (VmHWM), where Linux reports it.
    fn peak_rss_bytes() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    const HUGE: u64 = 100 << 20;

    #[test]
    fn a_100_mib_line_is_cut_at_the_bound_and_the_next_line_still_read() {
        let before = peak_rss_bytes();
        let input = LazyLine {
            left: HUGE,
            then: b"\r\nnext\r\n",
        };
        let mut lines = LineReader::new(BufReader::with_capacity(1 << 20, input));
        let first = lines.next_line().unwrap().unwrap();
        assert_eq!(first.number, 1);
        assert_eq!(first.bytes.len(), MAX_LINE_BYTES);
        assert_eq!(
            first.truncated_from,
            Some(HUGE + 1),
            "the \\r counts: it is content"
        );
        assert!(
            crate::event::parse(first.bytes)
                .is_err_and(|r| matches!(r, crate::event::Rejection::TooLarge(_)))
        );
        assert!(
            lines.held_capacity() <= MAX_LINE_BYTES,
            "{}",
            lines.held_capacity()
        );
        let next = lines.next_line().unwrap().unwrap();
        assert_eq!(
            (next.number, next.bytes, next.truncated_from),
            (2, &b"next"[..], None)
        );
        assert!(lines.next_line().unwrap().is_none());
        if let (Some(before), Some(after)) = (before, peak_rss_bytes()) {
            // The old `read_until` held the whole line: 100 MiB and more.
            assert!(
                after - before < 48 << 20,
                "peak RSS grew {} bytes",
                after - before
            );
        }
    }

    #[test]
    fn lines_at_the_bound_are_whole_and_a_small_bound_holds() {
        let mut lines = LineReader::with_limit(&b"abc\nabcd\nabcde\n\n\r\r\nend"[..], 4);
        let mut seen = Vec::new();
        while let Some(line) = lines.next_line().unwrap() {
            seen.push((line.number, line.bytes.to_vec(), line.truncated_from));
        }
        assert_eq!(
            seen,
            [
                (1, b"abc".to_vec(), None),
                (2, b"abcd".to_vec(), None),
                (3, b"abcd".to_vec(), Some(5)),
                (4, b"".to_vec(), None),
                (5, b"".to_vec(), None),
                (6, b"end".to_vec(), None),
            ]
        );
        assert!(lines.held_capacity() <= 4);
    }

    #[tokio::test]
    async fn a_gzip_bomb_is_read_with_flat_memory() {
        let dir = std::env::temp_dir().join(format!("pii-vault-bomb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bomb.jsonl.gz");
        // 100 MiB of one line compresses to about 100 KiB.
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::copy(
            &mut LazyLine {
                left: HUGE,
                then: b"\n{\"after\": 1}\n",
            },
            &mut encoder,
        )
        .unwrap();
        let compressed = encoder.finish().unwrap();
        assert!(compressed.len() < 1 << 20, "{}", compressed.len());
        std::fs::write(&path, compressed).unwrap();

        let source = FileSource::open(path.to_str().unwrap(), Some("bomb")).unwrap();
        let messages = source.receive().await.unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].id, line_id("bomb", 1));
        assert_eq!(messages[0].body.len(), MAX_LINE_BYTES);
        assert_eq!(
            (&messages[1].id, messages[1].body.as_slice()),
            (&line_id("bomb", 2), &b"{\"after\": 1}"[..])
        );
        assert!(source.receive().await.unwrap().is_empty(), "end of file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
