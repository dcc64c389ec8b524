//! Exports: the committed log written out in its stable forms
//! (`ExportedEntry::format_line`, `ExportedEntry::format_json`) a page at a
//! time, from the cluster (`write_stream` over a `LogStream`), from every
//! node's own replica into backup files (`write_backups`), or from a
//! stopped node's data directory (`LocalLog`). Nothing here holds more
//! than a page of the log.

use std::io::Write;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::raft::{Index, NodeId};
use crate::storage::{LogReader, Store};
use crate::wire::{ExportedEntry, Start, Until, PAGE, PAGE_BYTES};

use super::{Client, ClientError, LogStream};

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// How messages are written: `format_line` or `format_json`, one per line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Writes messages in `format`, one per line.
pub fn write_messages(
    out: &mut impl Write,
    messages: &[ExportedEntry],
    format: Format,
) -> std::io::Result<()> {
    for message in messages {
        let line = match format {
            Format::Text => message.format_line(),
            Format::Json => message.format_json(),
        };
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// Writes a stream's pages as they come, flushing after each, until it
/// ends (or, following, forever).
pub async fn write_stream<C: Deref<Target = Client>>(
    mut stream: LogStream<C>,
    out: &mut impl Write,
    format: Format,
) -> Result<()> {
    while let Some(page) = stream.next_page().await? {
        write_messages(out, &page, format)
            .and_then(|()| out.flush())
            .map_err(ClientError::Output)?;
    }
    Ok(())
}

/// How long `write_backups` waits for a node to hold what the cluster had
/// committed when it started.
const BACKUP_CATCH_UP: Duration = Duration::from_secs(30);

/// Writes `backup_<id>.txt` in `dir` for every node the client knows, each
/// from that node's own replica up to its commit, in the text form. The
/// backups are taken once each node holds what the cluster has committed
/// now (waiting up to 30 s for it), so they can be compared. `each` hears
/// of every node: the messages written and the file, or why there is no
/// backup; one node's failure does not stop the others.
pub async fn write_backups(
    client: &Client,
    dir: &Path,
    mut each: impl FnMut(NodeId, Result<(usize, PathBuf)>),
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|error| ClientError::File {
        what: format!("create {}", dir.display()),
        error,
    })?;
    let target = client.read_index().await?;
    for node in client.nodes() {
        let deadline = Instant::now() + BACKUP_CATCH_UP;
        while client.status(node).await.is_ok_and(|s| s.commit < target)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let path = dir.join(format!("backup_{node}.txt"));
        let written = write_backup(client, node, &path).await;
        each(node, written.map(|written| (written, path)));
    }
    Ok(())
}

/// Writes `node`'s own replica up to its commit into `path`, through a
/// file beside it that is renamed once complete. Returns the messages
/// written.
pub async fn write_backup(client: &Client, node: NodeId, path: &Path) -> Result<usize> {
    let partial = path.with_extension("txt.partial");
    let write_error = |error| ClientError::File {
        what: format!("write {}", partial.display()),
        error,
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(&partial).map_err(write_error)?);
    let mut stream = client
        .watch(Start::Index(1), Until::Commit)
        .only(node)
        .patience(Some(client.give_up_after));
    let mut written = 0;
    let copied = async {
        while let Some(page) = stream.next_page().await? {
            write_messages(&mut out, &page, Format::Text).map_err(write_error)?;
            written += page.len();
        }
        out.flush().map_err(write_error)
    }
    .await;
    match copied {
        Ok(()) => {
            std::fs::rename(&partial, path).map_err(|error| ClientError::File {
                what: format!("rename {} to {}", partial.display(), path.display()),
                error,
            })?;
            Ok(written)
        }
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            Err(error)
        }
    }
}

/// A stopped node's committed log, read from its data directory a page at
/// a time (`node export --local`).
pub struct LocalLog {
    data: PathBuf,
    log: LogReader,
    next: Index,
    commit: Index,
    /// Keeps the directory locked against a node starting meanwhile.
    _store: Store,
}

impl LocalLog {
    /// Opens the data directory (refused while a node runs on it) and
    /// reads up to the commit index it has recorded.
    pub fn open(data: &Path) -> Result<LocalLog> {
        let store = Store::open_existing(data, false)?;
        let commit = store.hard_state()?.commit;
        Ok(LocalLog {
            data: data.to_path_buf(),
            log: store.reader(),
            next: 1,
            commit,
            _store: store,
        })
    }

    /// The next committed messages in log order (a page may be empty when
    /// it holds only entries without a message); `None` at the commit.
    pub fn next_page(&mut self) -> Result<Option<Vec<ExportedEntry>>> {
        if self.next > self.commit {
            return Ok(None);
        }
        let entries = self
            .log
            .entries_within(self.next, self.commit, PAGE as usize, PAGE_BYTES)?;
        let Some(last) = entries.last() else {
            return Err(ClientError::MissingEntry {
                data: self.data.clone(),
                index: self.next,
                commit: self.commit,
            });
        };
        self.next = last.index + 1;
        Ok(Some(
            entries
                .into_iter()
                .filter_map(ExportedEntry::from_entry)
                .collect(),
        ))
    }

    /// Writes every committed message in `format`.
    pub fn write_all(mut self, out: &mut impl Write, format: Format) -> Result<()> {
        while let Some(page) = self.next_page()? {
            write_messages(out, &page, format).map_err(ClientError::Output)?;
        }
        out.flush().map_err(ClientError::Output)
    }
}
