//! JSON lines in a file, rotated by size and/or at UTC midnight, keeping N old files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use turnpike_model::observe::access_log::FileSink;

use super::worker::{Blocking, LineWriter, Lines};

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
    fn write_lines(&mut self, lines: &Lines) -> std::io::Result<()> {
        let bytes = lines.bytes();
        // A batch spans milliseconds: the day is read once for it.
        let day = today();
        if self.daily && day != self.day {
            self.rotate()?;
            self.day = day;
        }
        // Lines from `from` on are not written yet; they go in as few writes as rotation
        // allows (one, usually).
        let mut from = 0;
        let mut line_start = 0;
        for &end in lines.ends() {
            let len = (end - line_start) as u64;
            // The size counts what is pending too; a file is never left empty by rotation.
            let pending = self.size + (line_start - from) as u64;
            if self.max_bytes > 0 && pending > 0 && pending + len > self.max_bytes {
                self.append(&bytes[from..line_start])?;
                from = line_start;
                if self.size > 0 {
                    self.rotate()?;
                }
            }
            line_start = end;
        }
        self.append(&bytes[from..])
    }
}

impl FileWriter {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let f = self.open()?;
        let result = f.write_all(bytes);
        if result.is_err() {
            // Reopen next time: the file may have been removed or the disk remounted.
            self.file = None;
        }
        result?;
        self.size += bytes.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    /// A writer of `path` rotating past 25 bytes, keeping 2 old files.
    fn small(path: &std::path::Path) -> FileWriter {
        FileWriter {
            path: path.to_path_buf(),
            max_bytes: 25,
            daily: false,
            keep: 2,
            file: None,
            size: 0,
            day: today(),
        }
    }

    #[test]
    fn rotates_by_size_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/access.log");
        let mut w = small(&path);
        let line = |i: usize| format!("{{\"n\":{i:0>5}}}"); // 11 bytes + newline
        for i in 0..8 {
            let mut one = Lines::default();
            one.push(&line(i));
            w.write_lines(&one).unwrap();
        }
        // The same in one batch, into a fresh directory.
        let dir2 = tempfile::tempdir().unwrap();
        let path2 = dir2.path().join("access.log");
        let mut w2 = small(&path2);
        let mut all = Lines::default();
        for i in 0..8 {
            all.push(&line(i));
        }
        w2.write_lines(&all).unwrap();
        // 2 lines per file: 0-1, 2-3, 4-5, 6-7; the oldest two are gone.
        let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&path), format!("{}\n{}\n", line(6), line(7)));
        assert_eq!(read(&w.rotated(1)), format!("{}\n{}\n", line(4), line(5)));
        assert_eq!(read(&w.rotated(2)), format!("{}\n{}\n", line(2), line(3)));
        assert!(!w.rotated(3).exists());
        assert_eq!(read(&path2), read(&path));
        assert_eq!(read(&w2.rotated(1)), read(&w.rotated(1)));
        assert_eq!(read(&w2.rotated(2)), read(&w.rotated(2)));
        assert!(!w2.rotated(3).exists());
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
        let one = |text: &str| {
            let mut l = Lines::default();
            l.push(text);
            l
        };
        w.write_lines(&one("1")).unwrap();
        w.day -= 1; // as if the file had been opened yesterday
        w.write_lines(&one("2")).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "2\n");
        assert_eq!(std::fs::read_to_string(w.rotated(1)).unwrap(), "1\n");
    }
}
