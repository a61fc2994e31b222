//! The file source: JSON lines from a file, or from every file of a folder in name order.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use switchyard_crds::FileSource as Settings;
use tokio::io::AsyncBufReadExt;

use super::error::SourceError;
use super::framer::{self, Framer};
use super::unit::{Source, SourceUnit};

pub struct FileSource<'a>(pub &'a Settings);

/// The last line stored, by file name (names, not paths: the folder may move between runs).
#[derive(Serialize, Deserialize, Clone)]
struct FileCheckpoint {
    file: String,
    line: u64,
}

impl Source for FileSource<'_> {
    async fn run(&self, unit: &SourceUnit) -> Result<(), SourceError> {
        let path = Path::new(&self.0.path);
        unit.resuming(|| read_files(unit, path)).await
    }
}

async fn read_files(unit: &SourceUnit, path: &Path) -> Result<(), SourceError> {
    let files = list_files(path).await?;
    let resumed = framer::resume::<FileCheckpoint>(unit).await?;
    let resume_at = resumed.at.clone();
    let mut framer = Framer::new(unit, resumed);
    for file in &files {
        let name = file_name(file);
        let skip_to = match &resume_at {
            Some(c) if c.file.as_str() > name.as_str() => continue,
            Some(c) if c.file == name => c.line,
            _ => 0,
        };
        let unreadable = |source| SourceError::Read {
            path: file.clone(),
            source,
            hint: String::new(),
        };
        let handle = tokio::fs::File::open(file).await.map_err(unreadable)?;
        let mut lines = tokio::io::BufReader::new(handle).split(b'\n');
        let mut line_no = 0u64;
        while let Some(line) = lines.next_segment().await.map_err(unreadable)? {
            line_no += 1;
            if line_no <= skip_to || unit.stopping() {
                continue;
            }
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let lineage = unit.lineage(format!("{name}:{line_no}"));
            let position = FileCheckpoint {
                file: name.clone(),
                line: line_no,
            };
            // A file's lines are all waiting: they go in frames as full as the limits allow.
            framer
                .offer(unit, lineage, Bytes::copy_from_slice(line), position)
                .await?;
        }
        if unit.stopping() {
            break;
        }
    }
    framer.finish(unit).await
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

async fn list_files(path: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let unreadable = |source| SourceError::Read {
        path: path.to_path_buf(),
        source,
        hint: format!(
            " (relative paths start in {})",
            std::env::current_dir().unwrap_or_default().display()
        ),
    };
    let meta = tokio::fs::metadata(path).await.map_err(unreadable)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut entries = tokio::fs::read_dir(path).await.map_err(unreadable)?;
    while let Some(entry) = entries.next_entry().await.map_err(unreadable)? {
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && entry.file_type().await.map_err(unreadable)?.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}
