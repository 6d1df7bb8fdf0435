//! Maps a document path (`routes[2].paths[0]`) to the line and column where it is written.
//!
//! serde forgets positions once a value is deserialised, so semantic errors found later only
//! know their path. We re-read the text with a YAML event parser (JSON is YAML too), remember
//! where every node starts, and walk the path.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Position of every node, keyed by its normalised path.
pub(crate) struct Index {
    positions: HashMap<String, (usize, usize)>,
}

impl Index {
    /// Line and column of `path`, or of its nearest ancestor that exists in the text.
    pub(crate) fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut p = path.to_owned();
        loop {
            if let Some(pos) = self.positions.get(&p) {
                return Some(*pos);
            }
            let cut = p.rfind(['.', '['])?;
            p.truncate(cut);
        }
    }
}

/// Builds the index, or `None` when the text is not parseable (the parse error is reported
/// elsewhere).
pub(crate) fn index(text: &str) -> Option<Index> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut builder, false).ok()?;
    Some(Index {
        positions: builder.positions,
    })
}

enum Frame {
    Map {
        path: String,
        key: Option<String>,
        expecting_key: bool,
    },
    Seq {
        path: String,
        next: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    positions: HashMap<String, (usize, usize)>,
}

impl Builder {
    /// The path of the node starting now, and advances the parent's state.
    /// Returns `None` when the node is a mapping key.
    fn child_path(&mut self, scalar: Option<&str>) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
            Some(Frame::Map {
                path,
                key,
                expecting_key,
            }) => {
                if *expecting_key {
                    *key = scalar.map(str::to_owned);
                    *expecting_key = false;
                    None
                } else {
                    *expecting_key = true;
                    let k = key.take().unwrap_or_default();
                    Some(if path.is_empty() {
                        k
                    } else {
                        format!("{path}.{k}")
                    })
                }
            }
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        // Columns are reported 1-based like lines, to match editors and serde.
        let pos = (mark.line(), mark.col() + 1);
        match ev {
            Event::Scalar(value, ..) => {
                let is_key = matches!(
                    self.stack.last(),
                    Some(Frame::Map {
                        expecting_key: true,
                        ..
                    })
                );
                if is_key {
                    // Point errors about a key's value at the key itself: that is where the
                    // user looks, and a block value may start on the next line.
                    let path = match self.stack.last() {
                        Some(Frame::Map { path, .. }) if path.is_empty() => value.clone(),
                        Some(Frame::Map { path, .. }) => format!("{path}.{value}"),
                        _ => value.clone(),
                    };
                    self.positions.entry(path).or_insert(pos);
                    self.child_path(Some(&value));
                } else if let Some(p) = self.child_path(None) {
                    self.positions.entry(p).or_insert(pos);
                }
            }
            Event::Alias(_) => {
                if let Some(p) = self.child_path(None) {
                    self.positions.entry(p).or_insert(pos);
                }
            }
            Event::MappingStart(..) => {
                let p = self.child_path(None).unwrap_or_default();
                self.positions.entry(p.clone()).or_insert(pos);
                self.stack.push(Frame::Map {
                    path: p,
                    key: None,
                    expecting_key: true,
                });
            }
            Event::SequenceStart(..) => {
                let p = self.child_path(None).unwrap_or_default();
                self.positions.entry(p.clone()).or_insert(pos);
                self.stack.push(Frame::Seq { path: p, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_paths() {
        let text = "a:\n  b:\n    - x: 1\n    - x: 2\n      y: [1, 2]\n";
        let ix = index(text).unwrap();
        assert_eq!(ix.find("a.b[1].x").map(|p| p.0), Some(4));
        assert_eq!(ix.find("a.b[1].y[1]").map(|p| p.0), Some(5));
        // Unknown leaf falls back to the nearest known ancestor.
        assert_eq!(ix.find("a.b[0].zzz").map(|p| p.0), Some(3));
    }

    #[test]
    fn json_is_indexed_too() {
        let text = "{\n \"r\": [\n  {\"n\": 1},\n  {\"n\": 2}\n ]\n}";
        let ix = index(text).unwrap();
        assert_eq!(ix.find("r[1].n").map(|p| p.0), Some(4));
    }
}
