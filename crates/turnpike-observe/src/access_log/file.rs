//! JSON lines in a file, rotated by size and/or at UTC midnight, keeping N old files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use turnpike_model::observe::access_log::FileSink;

use super::worker::{Blocking, LineWriter};

/// The file being written and when it must be rotated.
pub(crate) struct FileWriter {
    path: PathBuf,
    max_bytes: u64,
    daily: bool,
    keep: usize,
    file: Option<File>,
    size: u64,
    /// Days since the Unix epoch (UTC) the open file belongs to.
    day: i64,
}

fn today() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    i64::try_from(secs / 86_400).unwrap_or(0)
}

impl FileWriter {
    pub(crate) fn new(cfg: &FileSink) -> Blocking<Self> {
        Blocking::new(Self {
            path: PathBuf::from(&cfg.path),
            max_bytes: cfg.max_bytes,
            daily: cfg.daily,
            keep: cfg.keep,
            file: None,
            size: 0,
            day: today(),
        })
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    /// `path` becomes `path.1`, `path.1` becomes `path.2`, ...; the one past `keep` goes.
    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(mut f) = self.file.take() {
            f.flush()?;
        }
        if self.keep == 0 {
            remove_if_exists(&self.path)?;
        } else {
            remove_if_exists(&self.rotated(self.keep))?;
            for n in (1..self.keep).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            if self.path.exists() {
                std::fs::rename(&self.path, self.rotated(1))?;
            }
        }
        self.size = 0;
        Ok(())
    }

    fn open(&mut self) -> std::io::Result<&mut File> {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir)?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        self.file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("file not open"))
    }
}

fn remove_if_exists(p: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl LineWriter for FileWriter {
    fn write_lines(&mut self, lines: &[String]) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for l in lines {
            let len = l.len() as u64 + 1;
            let day = today();
            if self.daily && day != self.day {
                self.flush_buf(&mut buf)?;
                self.rotate()?;
                self.day = day;
            }
            // The size counts what is buffered too; a file is never left empty by rotation.
            let pending = self.size + buf.len() as u64;
            if self.max_bytes > 0 && pending > 0 && pending + len > self.max_bytes {
                self.flush_buf(&mut buf)?;
                if self.size > 0 {
                    self.rotate()?;
                }
            }
            buf.extend_from_slice(l.as_bytes());
            buf.push(b'\n');
        }
        self.flush_buf(&mut buf)
    }
}

impl FileWriter {
    fn flush_buf(&mut self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let f = self.open()?;
        let result = f.write_all(buf);
        if result.is_err() {
            // Reopen next time: the file may have been removed or the disk remounted.
            self.file = None;
        }
        result?;
        self.size += buf.len() as u64;
        buf.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/access.log");
        let mut w = FileWriter {
            path: path.clone(),
            max_bytes: 25,
            daily: false,
            keep: 2,
            file: None,
            size: 0,
            day: today(),
        };
        let line = |i: usize| format!("{{\"n\":{i:0>5}}}"); // 11 bytes + newline
        for i in 0..8 {
            w.write_lines(&[line(i)]).unwrap();
        }
        // 2 lines per file: 0-1, 2-3, 4-5, 6-7; the oldest two are gone.
        let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&path), format!("{}\n{}\n", line(6), line(7)));
        assert_eq!(read(&w.rotated(1)), format!("{}\n{}\n", line(4), line(5)));
        assert_eq!(read(&w.rotated(2)), format!("{}\n{}\n", line(2), line(3)));
        assert!(!w.rotated(3).exists());
    }

    #[test]
    fn rotates_when_the_day_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let mut w = FileWriter {
            path: path.clone(),
            max_bytes: 0,
            daily: true,
            keep: 3,
            file: None,
            size: 0,
            day: today(),
        };
        w.write_lines(&["1".into()]).unwrap();
        w.day -= 1; // as if the file had been opened yesterday
        w.write_lines(&["2".into()]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "2\n");
        assert_eq!(std::fs::read_to_string(w.rotated(1)).unwrap(), "1\n");
    }
}
