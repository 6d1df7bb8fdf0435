//! JSON lines on standard output (for containers whose runtime collects stdout).

use std::io::Write;

use super::worker::{Blocking, LineWriter, Lines};

/// Writes each group of lines with one lock of stdout, so lines from concurrent writers
/// never interleave mid-line.
pub(crate) struct Stdout;

impl Stdout {
    pub(crate) fn new() -> Blocking<Self> {
        Blocking::new(Self)
    }
}

/// Appends `lines` to `out`.
pub(crate) fn write_lines(out: &mut impl Write, lines: &Lines) -> std::io::Result<()> {
    out.write_all(lines.bytes())?;
    out.flush()
}

impl LineWriter for Stdout {
    fn write_lines(&mut self, lines: &Lines) -> std::io::Result<()> {
        write_lines(&mut std::io::stdout().lock(), lines)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::access_log::format::Formatter;
    use std::sync::Arc;
    use turnpike_model::observe::access_log::AccessField;

    #[test]
    fn one_json_object_per_line() {
        let f = Formatter::new(AccessField::BASIC, None);
        let e = crate::tests::event();
        let mut out = Vec::new();
        write_lines(
            &mut out,
            &Lines::format(&[Arc::new(e.clone()), Arc::new(e)], &f),
        )
        .unwrap();
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
