//! The part of HTTP Structured Field Values (RFC 8941) that message signatures need:
//! dictionaries of inner lists and items with parameters, parsed and serialised.
//!
//! Written here rather than taken from a crate: the maintained `sfv` crate needs a newer
//! Rust than the workspace's minimum, and signatures use a small, closed subset. Decimals
//! are refused (no signature parameter is one), which keeps serialisation canonical without
//! the decimal rounding rules.

use base64::Engine;

/// A bare item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bare {
    /// `42`, `-7`.
    Integer(i64),
    /// `"text"`.
    String(String),
    /// `token`.
    Token(String),
    /// `:base64:`.
    Bytes(Vec<u8>),
    /// `?1`, `?0`.
    Boolean(bool),
}

/// Parameters, in the order received (a repeated key keeps its first place, last value).
pub type Params = Vec<(String, Bare)>;

/// An item with its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The value.
    pub bare: Bare,
    /// Its parameters.
    pub params: Params,
}

/// A dictionary member's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    /// A single item.
    Item(Item),
    /// `(a b c);params`.
    InnerList(Vec<Item>, Params),
}

/// Why a field did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub &'static str);

/// Longest integer RFC 8941 allows, in digits.
const MAX_INTEGER_DIGITS: usize = 15;

/// Most dictionary members, inner-list items and parameters of one item accepted. RFC 8941
/// asks parsers to take more (1024, 256), but signature fields carry a handful, and these
/// fields arrive before authentication: the caps keep a crafted header from costing more
/// than a few thousand key comparisons.
const MAX_MEMBERS: usize = 64;
const MAX_ITEMS: usize = 64;
const MAX_PARAMS: usize = 32;

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
}

/// Parses a dictionary (RFC 8941 §4.2.2). Field lines of one field are joined with `,`
/// before parsing, as §4.2 says.
pub fn parse_dictionary(input: &str) -> Result<Vec<(String, Member)>, ParseError> {
    let mut p = Parser {
        input: input.as_bytes(),
        pos: 0,
    };
    p.skip_sp();
    let mut out: Vec<(String, Member)> = Vec::new();
    while !p.done() {
        let key = p.key()?;
        let member = if p.eat(b'=') {
            p.member()?
        } else {
            Member::Item(Item {
                bare: Bare::Boolean(true),
                params: p.params()?,
            })
        };
        let full = out.len() >= MAX_MEMBERS;
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = member,
            None if full => return Err(ParseError("too many dictionary members")),
            None => out.push((key, member)),
        }
        p.skip_ows();
        if p.done() {
            return Ok(out);
        }
        if !p.eat(b',') {
            return Err(ParseError("expected `,` between dictionary members"));
        }
        p.skip_ows();
        if p.done() {
            return Err(ParseError("trailing `,` in a dictionary"));
        }
    }
    Ok(out)
}

impl Parser<'_> {
    fn done(&self) -> bool {
        self.pos >= self.input.len()
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn skip_sp(&mut self) {
        while self.peek() == Some(b' ') {
            self.pos += 1;
        }
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    fn member(&mut self) -> Result<Member, ParseError> {
        if self.peek() == Some(b'(') {
            self.inner_list()
        } else {
            Ok(Member::Item(self.item()?))
        }
    }

    fn inner_list(&mut self) -> Result<Member, ParseError> {
        self.pos += 1;
        let mut items = Vec::new();
        loop {
            self.skip_sp();
            if self.eat(b')') {
                let params = self.params()?;
                return Ok(Member::InnerList(items, params));
            }
            if items.len() >= MAX_ITEMS {
                return Err(ParseError("too many items in an inner list"));
            }
            items.push(self.item()?);
            if !matches!(self.peek(), Some(b' ' | b')')) {
                return Err(ParseError("expected a space or `)` in an inner list"));
            }
        }
    }

    fn item(&mut self) -> Result<Item, ParseError> {
        let bare = self.bare()?;
        let params = self.params()?;
        Ok(Item { bare, params })
    }

    fn params(&mut self) -> Result<Params, ParseError> {
        let mut out: Params = Vec::new();
        while self.eat(b';') {
            self.skip_sp();
            let key = self.key()?;
            let value = if self.eat(b'=') {
                self.bare()?
            } else {
                Bare::Boolean(true)
            };
            let full = out.len() >= MAX_PARAMS;
            match out.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = value,
                None if full => return Err(ParseError("too many parameters")),
                None => out.push((key, value)),
            }
        }
        Ok(out)
    }

    fn key(&mut self) -> Result<String, ParseError> {
        let start = self.pos;
        match self.peek() {
            Some(b) if b.is_ascii_lowercase() || b == b'*' => self.pos += 1,
            _ => {
                return Err(ParseError(
                    "a key must start with a lower-case letter or `*`",
                ));
            }
        }
        while let Some(b) = self.peek() {
            if b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'_' | b'-' | b'.' | b'*')
            {
                self.pos += 1;
            } else {
                break;
            }
        }
        Ok(String::from_utf8_lossy(&self.input[start..self.pos]).into_owned())
    }

    fn bare(&mut self) -> Result<Bare, ParseError> {
        match self.peek() {
            Some(b'-' | b'0'..=b'9') => self.integer(),
            Some(b'"') => self.string(),
            Some(b':') => self.bytes(),
            Some(b'?') => self.boolean(),
            Some(b) if b.is_ascii_alphabetic() || b == b'*' => Ok(self.token()),
            _ => Err(ParseError("expected an item")),
        }
    }

    fn integer(&mut self) -> Result<Bare, ParseError> {
        let negative = self.eat(b'-');
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        let digits = &self.input[start..self.pos];
        if digits.is_empty() {
            return Err(ParseError("expected a digit"));
        }
        if self.peek() == Some(b'.') {
            return Err(ParseError("decimals are not supported here"));
        }
        if digits.len() > MAX_INTEGER_DIGITS {
            return Err(ParseError("integer too long"));
        }
        let mut n: i64 = 0;
        for d in digits {
            n = n * 10 + i64::from(d - b'0');
        }
        Ok(Bare::Integer(if negative { -n } else { n }))
    }

    fn string(&mut self) -> Result<Bare, ParseError> {
        self.pos += 1;
        let mut s = String::new();
        loop {
            match self.peek() {
                None => return Err(ParseError("unterminated string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Bare::String(s));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(c @ (b'"' | b'\\')) => {
                            s.push(char::from(c));
                            self.pos += 1;
                        }
                        _ => return Err(ParseError("bad escape in a string")),
                    }
                }
                Some(c @ 0x20..=0x7e) => {
                    s.push(char::from(c));
                    self.pos += 1;
                }
                Some(_) => return Err(ParseError("a string may hold only printable ASCII")),
            }
        }
    }

    fn token(&mut self) -> Bare {
        let start = self.pos;
        self.pos += 1;
        while self
            .peek()
            .is_some_and(|b| is_tchar(b) || b == b':' || b == b'/')
        {
            self.pos += 1;
        }
        Bare::Token(String::from_utf8_lossy(&self.input[start..self.pos]).into_owned())
    }

    fn bytes(&mut self) -> Result<Bare, ParseError> {
        self.pos += 1;
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
        {
            self.pos += 1;
        }
        let encoded = &self.input[start..self.pos];
        if !self.eat(b':') {
            return Err(ParseError("unterminated byte sequence"));
        }
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map(Bare::Bytes)
            .map_err(|_| ParseError("a byte sequence is not valid base64"))
    }

    fn boolean(&mut self) -> Result<Bare, ParseError> {
        self.pos += 1;
        let b = match self.peek() {
            Some(b'1') => true,
            Some(b'0') => false,
            _ => return Err(ParseError("a boolean is ?0 or ?1")),
        };
        self.pos += 1;
        Ok(Bare::Boolean(b))
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Appends the canonical serialisation of a bare item (RFC 8941 §4.1).
pub fn write_bare(out: &mut String, bare: &Bare) {
    match bare {
        Bare::Integer(n) => out.push_str(&n.to_string()),
        Bare::String(s) => {
            out.push('"');
            for c in s.chars() {
                if matches!(c, '"' | '\\') {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
        }
        Bare::Token(t) => out.push_str(t),
        Bare::Bytes(b) => {
            out.push(':');
            out.push_str(&base64::engine::general_purpose::STANDARD.encode(b));
            out.push(':');
        }
        Bare::Boolean(b) => out.push_str(if *b { "?1" } else { "?0" }),
    }
}

/// Appends parameters: `;key=value`, or `;key` for true.
pub fn write_params(out: &mut String, params: &Params) {
    for (k, v) in params {
        out.push(';');
        out.push_str(k);
        if *v != Bare::Boolean(true) {
            out.push('=');
            write_bare(out, v);
        }
    }
}

/// Appends an item with its parameters.
pub fn write_item(out: &mut String, item: &Item) {
    write_bare(out, &item.bare);
    write_params(out, &item.params);
}

/// Appends an inner list with its parameters.
pub fn write_inner_list(out: &mut String, items: &[Item], params: &Params) {
    out.push('(');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        write_item(out, item);
    }
    out.push(')');
    write_params(out, params);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn crafted_sizes_are_refused_early() {
        let members: Vec<String> = (0..=MAX_MEMBERS).map(|i| format!("a{i}")).collect();
        assert!(parse_dictionary(&members[..MAX_MEMBERS].join(",")).is_ok());
        assert_eq!(
            parse_dictionary(&members.join(",")),
            Err(ParseError("too many dictionary members"))
        );
        let params: String = (0..=MAX_PARAMS).map(|i| format!(";p{i}")).collect();
        assert_eq!(
            parse_dictionary(&format!("a{params}")),
            Err(ParseError("too many parameters"))
        );
        let items: Vec<String> = (0..=MAX_ITEMS).map(|i| format!("\"c{i}\"")).collect();
        assert_eq!(
            parse_dictionary(&format!("a=({})", items.join(" "))),
            Err(ParseError("too many items in an inner list"))
        );
        // Repeated keys do not count twice.
        let repeated = vec!["a=1"; 10 * MAX_MEMBERS].join(",");
        assert!(parse_dictionary(&repeated).is_ok());
    }

    #[test]
    fn signature_input_round_trips_canonically() {
        let d = parse_dictionary(
            r#"sig1=( "@method"  "@query-param";name="a b" "x" );created=1618884473;keyid="k\"1";alg=hmac-sha256;flag, sig2=:AAEC:"#,
        )
        .unwrap();
        assert_eq!(d.len(), 2);
        let Member::InnerList(items, params) = &d[0].1 else {
            panic!("inner list expected");
        };
        let mut s = String::new();
        write_inner_list(&mut s, items, params);
        assert_eq!(
            s,
            r#"("@method" "@query-param";name="a b" "x");created=1618884473;keyid="k\"1";alg=hmac-sha256;flag"#
        );
        assert_eq!(
            d[1].1,
            Member::Item(Item {
                bare: Bare::Bytes(vec![0, 1, 2]),
                params: vec![]
            })
        );
    }

    #[test]
    fn malformed_fields_are_refused() {
        for bad in [
            "sig1=(\"a\"",
            "sig1=(\"a\")x",
            "Sig1=(\"a\")",
            "sig1=(\"a\"),",
            "sig1=(\"a\");created=1.5",
            "sig1=:not base64!:",
            "sig1=\"unterminated",
            "sig1=?2",
            "sig1=(\"a\")created=1",
            "sig1=1234567890123456",
        ] {
            assert!(parse_dictionary(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn repeated_keys_keep_their_place_and_take_the_last_value() {
        let d = parse_dictionary("a=1, b=2, a=3").unwrap();
        let keys: Vec<&str> = d.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(
            d[0].1,
            Member::Item(Item {
                bare: Bare::Integer(3),
                params: vec![]
            })
        );
        assert!(parse_dictionary("").unwrap().is_empty());
        assert_eq!(
            parse_dictionary("a, b=?0").unwrap()[1].1,
            Member::Item(Item {
                bare: Bare::Boolean(false),
                params: vec![]
            })
        );
    }
}
