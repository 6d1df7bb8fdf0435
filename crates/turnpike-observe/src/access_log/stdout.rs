//! JSON lines on standard output (for containers whose runtime collects stdout).

use std::io::Write;

use super::worker::{Blocking, LineWriter};

/// Writes each group of lines with one lock of stdout, so lines from concurrent writers
/// never interleave mid-line.
pub(crate) struct Stdout;

impl Stdout {
    pub(crate) fn new() -> Blocking<Self> {
        Blocking::new(Self)
    }
}

/// Appends `lines` to `out`, one per line.
pub(crate) fn write_lines(out: &mut impl Write, lines: &[String]) -> std::io::Result<()> {
    for l in lines {
        out.write_all(l.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

impl LineWriter for Stdout {
    fn write_lines(&mut self, lines: &[String]) -> std::io::Result<()> {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        write_lines(&mut out, lines)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::access_log::format::Formatter;
    use turnpike_model::observe::access_log::AccessField;

    #[test]
    fn one_json_object_per_line() {
        let f = Formatter::new(AccessField::BASIC, None);
        let e = crate::tests::event();
        let mut out = Vec::new();
        write_lines(&mut out, &[f.line(&e), f.line(&e)]).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        for l in lines {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["request_id"], "r");
            assert_eq!(v["status"], 200);
        }
    }
}
