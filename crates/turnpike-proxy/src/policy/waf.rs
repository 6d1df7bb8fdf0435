//! `waf`: a rule set against SQL injection, cross-site scripting, path traversal and command
//! injection, matched on normalised values of the request.
//!
//! # How a request is inspected
//!
//! The request is cut into *values*, each with a location: the path (`path`), every query
//! parameter's name and value (`query:NAME`), the configured headers (`header:NAME`; the
//! `Cookie` header is split into `cookie:NAME`), and the body: JSON keys and string values
//! (`body:/json/pointer`), form fields (`body:/NAME`) or the raw text (`body`). Each value is
//! normalised ([`normalize`]) and matched once against all enabled rules with a
//! [`regex::RegexSet`] (linear time, one pass over the text whatever the number of rules).
//!
//! Normalisation undoes what attackers use to slip past pattern matching: repeated
//! percent-decoding (bounded), `%uXXXX`, `+` as space in queries and forms, overlong UTF-8
//! (`%c0%ae`), HTML character references (`&#x3c;`), fullwidth letters, NUL and control
//! bytes, SQL comments (`/**/`, `/*!50000 ... */`), case, and runs of whitespace.
//!
//! The rule table ([`RULES`]) is documented in `docs/POLICIES.md`; ids are stable.

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use regex::RegexSet;
use turnpike_model::policy::{Oversize, WafCategory, WafConfig, WafMode};

use crate::error::{ErrorKind, GatewayError};

/// One rule: a stable id, its category, what it catches, and its pattern (matched on the
/// normalised, lower-case value).
pub struct Rule {
    /// Stable id (`sqli-union-select`).
    pub id: &'static str,
    /// Family.
    pub category: WafCategory,
    /// What it catches, for the docs and logs.
    pub what: &'static str,
    /// Pattern (regex crate syntax).
    pub pattern: &'static str,
}

use WafCategory::{Cmdi, Sqli, Traversal, Xss};

/// Shell commands an injected command line typically starts with.
macro_rules! shell_cmds {
    () => {
        r"(?:cat|ls|id|whoami|uname|wget|curl|nc|ncat|netcat|bash|sh|zsh|ksh|python[23]?|perl|ruby|php|ping|nslookup|dig|rm|chmod|chown|echo|sleep|env|printenv|ifconfig|ipconfig|net|type|dir|busybox|telnet|powershell|cmd|cmd\.exe|reboot|shutdown|kill|ps|find|head|tail|xterm|mkfifo|base64)"
    };
}

/// The rule set. Order matters only for which rule is reported first.
pub const RULES: &[Rule] = &[
    // SQL injection.
    Rule {
        id: "sqli-union-select",
        category: Sqli,
        what: "UNION [ALL] SELECT that appends a query's rows",
        pattern: r"\bunion(?:\s+(?:all|distinct))?[\s(]*select\b",
    },
    Rule {
        id: "sqli-tautology",
        category: Sqli,
        what: "a quote closed, then OR/AND with a comparison or constant (`' or '1'='1`, `' or 1=1--`, `' or true#`)",
        pattern: r#"['"`]\s*\)*\s*(?:or|and|xor|\|\||&&)\s*\(*\s*(?:['"`]?[\w.@]*['"`]?\s*(?:=|<=>|<>|!=|<|>|\blike\b|\brlike\b|\bregexp\b|\bis\b|\bin\s*\(|\bbetween\b)|(?:true|false|not|\d+)\s*(?:--|#|;|/\*|$))"#,
    },
    Rule {
        id: "sqli-boolean-compare",
        category: Sqli,
        what: "OR/AND followed by a constant comparison (`or 1=1`, `and 'a'='a'`)",
        pattern: r#"\b(?:or|and|xor)\s+\(*\s*(?:\d+|'[^']*'|"[^"]*"|true|false)\s*(?:=|<>|!=|<|>|\blike\b)\s*\(*\s*(?:\d+|'[^']*'|"[^"]*"|true|false)"#,
    },
    Rule {
        id: "sqli-comment-truncation",
        category: Sqli,
        what: "a quote closed and the rest of the query commented out (`admin'--`, `')#`)",
        pattern: r#"['"`]\s*\)*\s*(?:--(?:\s|$|-)|#(?:\s|$)|;\s*(?:--|#|$)|/\*)"#,
    },
    Rule {
        id: "sqli-stacked-query",
        category: Sqli,
        what: "a second statement after `;` (DROP TABLE, DELETE FROM, INSERT INTO, UPDATE … SET, EXEC, SHUTDOWN, DECLARE @)",
        pattern: r#";\s*(?:drop\s+(?:table|database|schema|view|user|index)\b|delete\s+from\b|insert\s+into\b|update\s+[\w.`"\[\]]+\s+set\b|alter\s+(?:table|user|database)\b|truncate\s+(?:table\s+)?\w|create\s+(?:table|user|function|procedure|trigger)\b|exec(?:ute)?\s+\w|shutdown\b|declare\s+@|select\b.{0,80}\bfrom\b|grant\s+\w+.{0,40}\bto\b)"#,
    },
    Rule {
        id: "sqli-time-based",
        category: Sqli,
        what: "time delays used for blind injection (SLEEP(n), PG_SLEEP, BENCHMARK, WAITFOR DELAY, DBMS_LOCK.SLEEP)",
        pattern: r"\b(?:sleep|pg_sleep|benchmark)\s*\(\s*\d|\bwaitfor\s+(?:delay|time)\s+'|\bdbms_lock\.sleep\b|\bpg_sleep\b",
    },
    Rule {
        id: "sqli-dangerous-function",
        category: Sqli,
        what: "functions that read files, run commands or leak data through errors (LOAD_FILE, XP_CMDSHELL, EXTRACTVALUE, UPDATEXML, CHAR(n,n,…), @@version, INTO OUTFILE)",
        pattern: r"\b(?:load_file|extractvalue|updatexml|xp_cmdshell|sp_executesql|sp_oacreate|utl_inaddr\.\w+|utl_http\.\w+|dbms_pipe\.\w+)\s*\(|\b(?:char|chr)\s*\(\s*\d+\s*(?:,\s*\d+\s*){2,}\)|@@(?:version|datadir|hostname|basedir)\b|\binto\s+(?:out|dump)file\b|\bconcat(?:_ws)?\s*\([^)]{0,60}(?:0x[0-9a-f]{2,}|@@|\bselect\b)",
    },
    Rule {
        id: "sqli-schema-probe",
        category: Sqli,
        what: "reads of the database catalogue (information_schema, sysobjects, pg_catalog, sqlite_master, mysql.user)",
        pattern: r"\b(?:information_schema|sysobjects|syscolumns|pg_catalog|pg_shadow|sqlite_master|mysql\.user|all_tables|sys\.tables)\b",
    },
    Rule {
        id: "sqli-subquery",
        category: Sqli,
        what: "a sub-select opened after a quote, `=`, IN or EXISTS (`'+(select ...`, `in (select`)",
        pattern: r#"(?:['"=]|\bin\b|\bexists\b)\s*[-+|,*/]*\s*\(+\s*select\b"#,
    },
    Rule {
        id: "sqli-order-probe",
        category: Sqli,
        what: "column-count probing after a closed value (`1' order by 3--`, `' group by 1#`)",
        pattern: r#"['"\d)]\s*(?:order|group)\s+by\s+\d+\s*(?:--|#|;|/\*|$)"#,
    },
    // Cross-site scripting.
    Rule {
        id: "xss-script-tag",
        category: Xss,
        what: "a <script> tag (opening or closing)",
        pattern: r"<\s*/?\s*script\b",
    },
    Rule {
        id: "xss-event-handler",
        category: Xss,
        what: "an on* event handler attribute in a tag or after a broken-out attribute (`<img src=x onerror=`, `\" onmouseover=`)",
        pattern: r#"(?:<[a-z!][^>]*|['"`])[\s/]+on[a-z]{3,}\s*="#,
    },
    Rule {
        id: "xss-js-uri",
        category: Xss,
        what: "javascript:/vbscript: URIs that run code, and HTML/SVG data: URIs",
        pattern: r#"\b(?:java\s*|vb\s*|live\s*)script\s*:\s*[\w.$\[\]'"]*\s*[(`=]|\bdata\s*:\s*(?:text/html|application/x?html|image/svg\+xml)"#,
    },
    Rule {
        id: "xss-dangerous-tag",
        category: Xss,
        what: "tags that load or run active content (<iframe>, <object>, <embed>, <applet>, <base>, <meta http-equiv>, <frame>)",
        pattern: r"<\s*(?:iframe|frame|frameset|object|embed|applet|base|isindex)\b|<\s*meta\b[^>]*http-equiv",
    },
    Rule {
        id: "xss-attribute-breakout",
        category: Xss,
        what: "a value that closes an attribute and its tag to open a new one (`\"><img`, `'></title><svg`)",
        pattern: r#"^[^<>]*['"`]\s*/?>\s*(?:</[a-z]+>\s*)*<\s*[a-z!/]"#,
    },
    Rule {
        id: "xss-js-call",
        category: Xss,
        what: "alert/prompt/confirm/eval called after a quote, tag or statement break, and DOM sinks (document.cookie, .innerHTML=, String.fromCharCode)",
        pattern: r#"['"`>;)]\s*[;)+\-*/|&]*\s*(?:alert|prompt|confirm|eval|settimeout|setinterval)\s*[(`]|\bdocument\s*\.\s*(?:cookie|domain|write)\b.{0,40}[(=+]|\.innerhtml\s*=|\bstring\s*\.\s*fromcharcode\s*\(|\b(?:window|top|self)\s*\[\s*['"`]"#,
    },
    Rule {
        id: "xss-style-expression",
        category: Xss,
        what: "script in CSS (expression(), -moz-binding, behavior:, url(javascript:))",
        pattern: r"\bstyle\s*=[^>]{0,120}expression\s*\(|-moz-binding\s*:|\bbehaviou?r\s*:\s*url\s*\(|url\s*\(\s*['\x22]?\s*javascript\s*:",
    },
    Rule {
        id: "xss-template-injection",
        category: Xss,
        what: "client-side template breakouts that reach the JavaScript constructor (`{{constructor.constructor(...)}}`)",
        pattern: r"\{\{.{0,80}\bconstructor\b.{0,80}\}\}|\{\{\s*\$on\b",
    },
    // Path traversal and file inclusion.
    Rule {
        id: "traversal-dot-dot",
        category: Traversal,
        what: "`../` or `..\\` segments (after decoding; `..;/` included)",
        pattern: r"(?:^|[/=:;,'\x22\s])\.\.;?/|/\.\.(?:$|[?;#])|^\.\.$",
    },
    Rule {
        id: "traversal-sensitive-file",
        category: Traversal,
        what: "well-known sensitive files (/etc/passwd, /etc/shadow, /proc/self/, win.ini, boot.ini, .ssh keys, .htaccess, web.config, .git/, .env)",
        pattern: r"/etc/(?:passwd|shadow|group|hosts|issue|sudoers|crontab)\b|/proc/(?:self|\d+)/(?:environ|cmdline|maps|fd|root|cwd)|\bwin(?:dows|nt)/(?:win\.ini|system32|system\.ini)|\b(?:win|boot|system)\.ini\b|\.ssh/(?:id_[a-z0-9]+|authorized_keys|known_hosts)|(?:^|/)\.(?:htaccess|htpasswd|env|git/(?:config|head|index)|aws/credentials)\b|\bweb\.config\b|/var/log/(?:auth|syslog|apache|nginx)",
    },
    Rule {
        id: "traversal-scheme-wrapper",
        category: Traversal,
        what: "file and stream wrappers that reach local files or other protocols (file://, php://, phar://, zip://, expect://, gopher://, dict://)",
        pattern: r"\b(?:file|php|phar|zip|expect|glob|jar|gopher|dict|ldap|tftp)://",
    },
    // Command injection.
    Rule {
        id: "cmdi-chained-command",
        category: Cmdi,
        what: "a shell command after a separator (`;`, `|`, `||`, `&&`, `&`, newline, backtick, `$(`) followed by arguments, a path or the end",
        pattern: concat!(
            r"(?:[;|&\n`]|\$\()\s*(?:/(?:usr/)?s?bin/)?",
            shell_cmds!(),
            r#"(?:\s+(?:[-/$~.'"\\]|\d|https?://)|\s*[;|&`)<>]|\s*$)"#
        ),
    },
    Rule {
        id: "cmdi-substitution",
        category: Cmdi,
        what: "command substitution with a shell command inside (`` `id` ``, `$(whoami)`)",
        pattern: concat!(
            r"(?:`|\$\()\s*(?:/(?:usr/)?s?bin/)?",
            shell_cmds!(),
            r"\b[^`)]{0,80}[`)]"
        ),
    },
    Rule {
        id: "cmdi-shell-evasion",
        category: Cmdi,
        what: "shell tricks used only to evade filters (`${IFS}`, `$IFS$9`, `{cat,/etc/passwd}`, `c''at`, `/???/??t`)",
        pattern: r#"\$\{?ifs\b|\{\s*(?:cat|ls|id|wget|curl|nc|bash|sh)\s*,|\b[a-z]+(?:''|"")[a-z]+\s+/|/\?\?\?/"#,
    },
    Rule {
        id: "cmdi-reverse-shell",
        category: Cmdi,
        what: "reverse shells and remote payloads (/dev/tcp/, nc -e, bash -i, mkfifo, | sh after a download)",
        pattern: r"/dev/(?:tcp|udp)/|\b(?:nc|ncat|netcat)\b[^;|&]{0,60}\s-[a-z]*e\b|\b(?:bash|sh)\s+-[a-z]*i\b|\bmkfifo\b|\b(?:curl|wget)\b[^;|&]{0,120}\|\s*(?:ba)?sh\b",
    },
    Rule {
        id: "cmdi-windows",
        category: Cmdi,
        what: "Windows command lines after a separator (`& cmd /c`, `| powershell -enc`, `& net user`, `type c:\\`)",
        pattern: r"(?:[;|&`]|^)\s*(?:cmd(?:\.exe)?\s+/[ck]\b|powershell(?:\.exe)?\s+-|net\s+(?:user|localgroup)\b|type\s+[a-z]:/|certutil\b|bitsadmin\b)",
    },
];

/// The ids of every rule, for validation and docs.
pub fn rule_ids() -> impl Iterator<Item = &'static str> {
    RULES.iter().map(|r| r.id)
}

fn category_name(c: WafCategory) -> &'static str {
    match c {
        Sqli => "sqli",
        Xss => "xss",
        Traversal => "traversal",
        Cmdi => "cmdi",
    }
}

/// Where a value was found.
#[derive(Debug, Clone)]
pub enum Location {
    /// The request path.
    Path,
    /// A query parameter (name or value).
    Query(String),
    /// A header.
    Header(String),
    /// A cookie.
    Cookie(String),
    /// A JSON pointer or form field in the body.
    Body(String),
    /// The whole body, as text.
    BodyRaw,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path => f.write_str("path"),
            Self::Query(n) => write!(f, "query:{n}"),
            Self::Header(n) => write!(f, "header:{n}"),
            Self::Cookie(n) => write!(f, "cookie:{n}"),
            Self::Body(p) => write!(f, "body:{p}"),
            Self::BodyRaw => f.write_str("body"),
        }
    }
}

/// A rule that matched, and where.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The rule's id.
    pub rule: &'static str,
    /// Where (`query:q`).
    pub location: String,
}

struct Exclusion {
    /// Indexes into [`RULES`]; empty: every rule.
    rules: Vec<usize>,
    /// `(pattern, prefix?)`: a trailing `*` makes it a prefix.
    locations: Vec<(String, bool)>,
    path_prefixes: Vec<String>,
}

/// A compiled `waf` policy.
pub struct Waf {
    set: RegexSet,
    /// For each pattern of `set`, its index into [`RULES`].
    rule_of: Vec<usize>,
    exclusions: Vec<Exclusion>,
    headers: Vec<http::HeaderName>,
    /// The configuration (limits, mode, what to inspect).
    pub config: Arc<WafConfig>,
}

/// A WAF verdict for one request.
pub enum Verdict {
    /// Nothing matched.
    Clean,
    /// Rules matched (the first ones found; at most one in block mode).
    Matched(Vec<Finding>),
    /// More values than `max_args` and `oversize: block`.
    TooManyArgs,
}

impl Waf {
    /// Compiles the rule set the configuration enables. Errors name the field.
    pub fn new(config: WafConfig) -> Result<Self, (String, String)> {
        let known = |id: &str| RULES.iter().position(|r| r.id == id);
        for (field, list) in [
            ("rules", &config.rules),
            ("disabled_rules", &config.disabled_rules),
        ] {
            for (i, id) in list.iter().enumerate() {
                if known(id).is_none() {
                    return Err((format!("{field}[{i}]"), format!("unknown rule id `{id}`")));
                }
            }
        }
        let mut exclusions = Vec::new();
        for (i, e) in config.exclusions.iter().enumerate() {
            let mut rules = Vec::new();
            for (j, r) in e.rules.iter().enumerate() {
                if let Some(k) = known(r) {
                    rules.push(k);
                } else {
                    let cat: Vec<usize> = RULES
                        .iter()
                        .enumerate()
                        .filter(|(_, x)| category_name(x.category) == r)
                        .map(|(k, _)| k)
                        .collect();
                    if cat.is_empty() {
                        return Err((
                            format!("exclusions[{i}].rules[{j}]"),
                            format!("`{r}` is neither a rule id nor a category"),
                        ));
                    }
                    rules.extend(cat);
                }
            }
            exclusions.push(Exclusion {
                rules,
                locations: e
                    .locations
                    .iter()
                    .map(|l| match l.strip_suffix('*') {
                        Some(p) => (p.to_ascii_lowercase(), true),
                        None => (l.to_ascii_lowercase(), false),
                    })
                    .collect(),
                path_prefixes: e.path_prefixes.clone(),
            });
        }
        let mut patterns = Vec::new();
        let mut rule_of = Vec::new();
        for (k, r) in RULES.iter().enumerate() {
            let by_category =
                config.categories.is_empty() || config.categories.contains(&r.category);
            let by_list = config.rules.is_empty() || config.rules.iter().any(|x| x == r.id);
            let disabled = config.disabled_rules.iter().any(|x| x == r.id);
            if by_category && by_list && !disabled {
                patterns.push(r.pattern);
                rule_of.push(k);
            }
        }
        let set = regex::RegexSetBuilder::new(&patterns)
            .size_limit(64 << 20)
            .build()
            .map_err(|e| (String::new(), format!("rule set does not compile: {e}")))?;
        let headers = config
            .headers
            .iter()
            .filter_map(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
            .collect();
        Ok(Self {
            set,
            rule_of,
            exclusions,
            headers,
            config: Arc::new(config),
        })
    }

    /// Whether this policy reads the body.
    pub fn needs_body(&self) -> bool {
        self.config.inspect_body
    }

    /// Inspects a request. The path as sent (`raw_path`) is scanned, since normalising it
    /// would remove the `../` a traversal rule looks for; exclusions match the normalised
    /// `route_path` the route matched, so `/docs/../admin` is not under a `/docs` exclusion.
    /// `body` is `None` when it is not inspected (too large with `oversize: skip_body`, or
    /// not buffered).
    pub fn inspect(
        &self,
        raw_path: &str,
        route_path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        body: Option<&Bytes>,
    ) -> Verdict {
        let mut scan = Scan {
            waf: self,
            path: route_path,
            findings: Vec::new(),
            args: 0,
            too_many: false,
            buf: String::new(),
            stop_at_first: self.config.mode == WafMode::Block,
        };
        let c = &self.config;
        if c.inspect_path {
            scan.value(raw_path.as_bytes(), false, || Location::Path, false);
        }
        if c.inspect_query
            && let Some(q) = query
        {
            scan.form(q.as_bytes(), Location::Query);
        }
        for name in &self.headers {
            for v in headers.get_all(name) {
                if *name == http::header::COOKIE {
                    for pair in v.as_bytes().split(|b| *b == b';') {
                        let pair = trim(pair);
                        if pair.is_empty() {
                            continue;
                        }
                        let (n, val) = split_once(pair, b'=');
                        let n = String::from_utf8_lossy(n).into_owned();
                        scan.value(val, false, || Location::Cookie(n.clone()), true);
                        scan.value(n.as_bytes(), false, || Location::Cookie(n.clone()), true);
                    }
                } else {
                    scan.value(
                        v.as_bytes(),
                        false,
                        || Location::Header(name.as_str().to_owned()),
                        false,
                    );
                }
            }
        }
        if let Some(body) = body.filter(|_| c.inspect_body && !scan.done())
            && !body.is_empty()
        {
            scan.body(headers, body);
        }
        if scan.too_many && c.oversize == Oversize::Block {
            return Verdict::TooManyArgs;
        }
        if scan.findings.is_empty() {
            Verdict::Clean
        } else {
            Verdict::Matched(scan.findings)
        }
    }

    fn excluded(&self, rule: usize, location: &str, path: &str) -> bool {
        self.exclusions.iter().any(|e| {
            (e.rules.is_empty() || e.rules.contains(&rule))
                && (e.path_prefixes.is_empty() || e.path_prefixes.iter().any(|p| under(path, p)))
                && (e.locations.is_empty()
                    || e.locations.iter().any(|(l, prefix)| {
                        let loc = location.to_ascii_lowercase();
                        if *prefix {
                            loc.starts_with(l.as_str())
                        } else {
                            loc == *l
                        }
                    }))
        })
    }

    /// The error answered for a blocking finding: names the rule and the location, never
    /// the matched text.
    pub fn blocked(f: &Finding) -> GatewayError {
        GatewayError::new(
            ErrorKind::WafBlocked,
            format!("request blocked by WAF rule `{}` in {}", f.rule, f.location),
        )
    }
}

struct Scan<'a> {
    waf: &'a Waf,
    path: &'a str,
    findings: Vec<Finding>,
    args: usize,
    too_many: bool,
    buf: String,
    stop_at_first: bool,
}

impl Scan<'_> {
    fn done(&self) -> bool {
        (self.stop_at_first && !self.findings.is_empty()) || self.too_many
    }

    /// Normalises and matches one value. `counted`: it counts against `max_args`.
    fn value(&mut self, raw: &[u8], plus: bool, loc: impl FnOnce() -> Location, counted: bool) {
        if self.done() {
            return;
        }
        if counted {
            self.args += 1;
            if self.args > self.waf.config.max_args {
                self.too_many = true;
                return;
            }
        }
        if raw.is_empty() {
            return;
        }
        normalize(raw, plus, self.waf.config.max_decode_passes, &mut self.buf);
        let matches = self.waf.set.matches(&self.buf);
        if !matches.matched_any() {
            return;
        }
        let location = loc().to_string();
        for i in matches.iter() {
            let Some(&rule) = self.waf.rule_of.get(i) else {
                continue;
            };
            if self.waf.excluded(rule, &location, self.path) {
                continue;
            }
            if let Some(r) = RULES.get(rule) {
                self.findings.push(Finding {
                    rule: r.id,
                    location: location.clone(),
                });
            }
            if self.stop_at_first {
                return;
            }
        }
    }

    /// `a=b&c=d` (query or form body): names and values, `+` as space.
    fn form(&mut self, text: &[u8], loc: impl Fn(String) -> Location) {
        for pair in text.split(|b| *b == b'&') {
            if pair.is_empty() || self.done() {
                continue;
            }
            let (n, v) = split_once(pair, b'=');
            let name = display_name(n);
            self.value(v, true, || loc(name.clone()), true);
            self.value(n, true, || loc(name.clone()), false);
        }
    }

    fn body(&mut self, headers: &HeaderMap, body: &Bytes) {
        let ct = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or("").trim();
        if essence == "application/json" || essence.ends_with("+json") {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
                let mut pointer = String::new();
                self.json(&v, &mut pointer, 0);
                return;
            }
        } else if essence == "application/x-www-form-urlencoded" {
            self.form(body, |n| Location::Body(format!("/{n}")));
            return;
        } else if essence.starts_with("image/")
            || essence.starts_with("audio/")
            || essence.starts_with("video/")
            || essence == "application/octet-stream"
            || essence == "application/grpc"
            || essence.starts_with("application/grpc+")
            || essence == "application/zip"
            || essence == "application/pdf"
        {
            // Binary: patterns over it mean nothing.
            return;
        }
        self.value(body, false, || Location::BodyRaw, false);
    }

    fn json(&mut self, v: &serde_json::Value, pointer: &mut String, depth: usize) {
        if self.done() || depth > 64 {
            return;
        }
        match v {
            serde_json::Value::String(s) => {
                let p: &str = pointer;
                self.value(
                    s.as_bytes(),
                    false,
                    || {
                        Location::Body(if p.is_empty() {
                            "/".into()
                        } else {
                            p.to_owned()
                        })
                    },
                    true,
                );
            }
            serde_json::Value::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    if self.done() {
                        break;
                    }
                    let len = pointer.len();
                    pointer.push('/');
                    pointer.push_str(&i.to_string());
                    self.json(item, pointer, depth + 1);
                    pointer.truncate(len);
                }
            }
            serde_json::Value::Object(m) => {
                for (k, item) in m {
                    if self.done() {
                        break;
                    }
                    let len = pointer.len();
                    pointer.push('/');
                    pointer.push_str(&k.replace('~', "~0").replace('/', "~1"));
                    // Keys count against `max_args` too: a body of a million keys must not
                    // buy a million scans.
                    let p: &str = pointer;
                    self.value(k.as_bytes(), false, || Location::Body(p.to_owned()), true);
                    self.json(item, pointer, depth + 1);
                    pointer.truncate(len);
                }
            }
            _ => {}
        }
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    b.get(start..end).unwrap_or(&[])
}

fn split_once(b: &[u8], sep: u8) -> (&[u8], &[u8]) {
    match b.iter().position(|c| *c == sep) {
        Some(i) => (b.get(..i).unwrap_or(&[]), b.get(i + 1..).unwrap_or(&[])),
        None => (b, &[]),
    }
}

/// Whether `path` is `prefix` or below it, segment-wise: `/docs` covers `/docs` and
/// `/docs/x`, not `/docsecret`.
fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'))
}

/// A parameter name as exclusions name it: decoded once, `+` as space.
fn display_name(n: &[u8]) -> String {
    let plus: Vec<u8> = n
        .iter()
        .map(|b| if *b == b'+' { b' ' } else { *b })
        .collect();
    String::from_utf8_lossy(&percent_decode(&plus)).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// One round of percent-decoding, `%uXXXX` included; malformed escapes stay as they are.
fn percent_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let b = input.get(i).copied().unwrap_or(0);
        if b == b'%' {
            let at = |k: usize| input.get(i + k).copied().and_then(hex);
            if let (Some(h), Some(l)) = (at(1), at(2)) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
            if matches!(input.get(i + 1), Some(b'u' | b'U'))
                && let (Some(a), Some(b2), Some(c), Some(d)) = (at(2), at(3), at(4), at(5))
            {
                let cp = u32::from(a) << 12 | u32::from(b2) << 8 | u32::from(c) << 4 | u32::from(d);
                let ch = char::from_u32(cp).unwrap_or('\u{fffd}');
                let mut tmp = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
                i += 6;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    out
}

/// Folds overlong UTF-8 encodings of ASCII (`C0 AE` for `.`, `E0 80 AF` for `/`) into the
/// ASCII byte, as lenient decoders downstream would.
fn fold_overlong(input: &mut Vec<u8>) {
    if !input.iter().any(|b| *b == 0xc0 || *b == 0xc1 || *b == 0xe0) {
        return;
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let b0 = input.get(i).copied().unwrap_or(0);
        let b1 = input.get(i + 1).copied().unwrap_or(0);
        let b2 = input.get(i + 2).copied().unwrap_or(0);
        let cont = |b: u8| b & 0xc0 == 0x80;
        if (b0 == 0xc0 || b0 == 0xc1) && cont(b1) {
            out.push(((b0 & 0x1f) << 6) | (b1 & 0x3f));
            i += 2;
        } else if b0 == 0xe0 && (b1 & 0xe0) == 0x80 && cont(b2) {
            // E0 80..9F xx encodes a code point below 0x800; below 0x80 it is ASCII.
            let cp = (u32::from(b1 & 0x3f) << 6) | u32::from(b2 & 0x3f);
            if let Ok(a) = u8::try_from(cp) {
                out.push(a);
            } else {
                out.extend_from_slice(&[b0, b1, b2]);
            }
            i += 3;
        } else {
            out.push(b0);
            i += 1;
        }
    }
    *input = out;
}

/// HTML character references a browser would decode: numeric (`&#60;`, `&#x3c;`, with or
/// without `;`) and the few named ones that matter for markup and scripts.
fn decode_entities(s: &str) -> Option<String> {
    if !s.contains('&') {
        return None;
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(rest.get(..i).unwrap_or(""));
        let tail = rest.get(i + 1..).unwrap_or("");
        let (decoded, used) = entity(tail);
        match decoded {
            Some(c) => {
                out.push(c);
                rest = tail.get(used..).unwrap_or("");
            }
            None => {
                out.push('&');
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    Some(out)
}

fn entity(t: &str) -> (Option<char>, usize) {
    let lower: String = t.chars().take(10).collect::<String>().to_ascii_lowercase();
    if let Some(num) = lower.strip_prefix('#') {
        let (radix, digits, skip) = match num.strip_prefix('x') {
            Some(h) => (16, h, 2),
            None => (10, num, 1),
        };
        let len = digits.chars().take_while(|c| c.is_digit(radix)).count();
        if len == 0 {
            return (None, 0);
        }
        let value = u32::from_str_radix(digits.get(..len).unwrap_or("0"), radix).ok();
        let semi = usize::from(digits.get(len..).is_some_and(|r| r.starts_with(';')));
        return (value.and_then(char::from_u32), skip + len + semi);
    }
    for (name, c) in [
        ("lt;", '<'),
        ("gt;", '>'),
        ("quot;", '"'),
        ("apos;", '\''),
        ("amp;", '&'),
        ("colon;", ':'),
        ("lpar;", '('),
        ("rpar;", ')'),
        ("sol;", '/'),
        ("tab;", '\t'),
        ("newline;", '\n'),
        ("grave;", '`'),
        ("equals;", '='),
        ("semi;", ';'),
    ] {
        if lower.starts_with(name) {
            return (Some(c), name.len());
        }
    }
    (None, 0)
}

/// Normalises one value into `out` (see the module docs). `plus`: `+` means space (query
/// strings and forms).
pub fn normalize(raw: &[u8], plus: bool, passes: u8, out: &mut String) {
    let mut bytes: Vec<u8> = if plus {
        raw.iter()
            .map(|b| if *b == b'+' { b' ' } else { *b })
            .collect()
    } else {
        raw.to_vec()
    };
    for _ in 0..passes {
        if !bytes.contains(&b'%') {
            break;
        }
        let next = percent_decode(&bytes);
        if next == bytes {
            break;
        }
        bytes = next;
    }
    fold_overlong(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let text = match decode_entities(&text) {
        // Twice: `&amp;lt;` is how an entity hides from one decoding.
        Some(once) => decode_entities(&once).unwrap_or(once),
        None => text.into_owned(),
    };
    let mut mapped = String::with_capacity(text.len());
    for c in text.chars() {
        let c = match c {
            '\0' | '\u{ad}' | '\u{200b}'..='\u{200d}' | '\u{feff}' => continue,
            '\\' | '\u{2215}' | '\u{2044}' | '\u{29f8}' => '/',
            '\n' => '\n',
            c if c.is_whitespace() || c.is_control() => ' ',
            // Fullwidth ASCII (U+FF01..FF5E) reads as ASCII to many back ends.
            c @ '\u{ff01}'..='\u{ff5e}' => char::from_u32(c as u32 - 0xfee0).unwrap_or(c),
            c => c,
        };
        for l in c.to_lowercase() {
            mapped.push(l);
        }
    }
    strip_sql_comments(&mut mapped);
    out.clear();
    let mut last_space = true;
    for c in mapped.chars() {
        if c == ' ' {
            if last_space {
                continue;
            }
            last_space = true;
        } else {
            last_space = false;
        }
        out.push(c);
    }
    if out.ends_with(' ') {
        out.pop();
    }
}

/// `/* ... */` becomes a space; MySQL's `/*!50000 ... */` keeps its content (it runs).
fn strip_sql_comments(s: &mut String) {
    if !s.contains("/*") {
        return;
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(i) = rest.find("/*") {
        out.push_str(rest.get(..i).unwrap_or(""));
        let after = rest.get(i + 2..).unwrap_or("");
        match after.find("*/") {
            Some(j) => {
                let inner = after.get(..j).unwrap_or("");
                out.push(' ');
                if let Some(exec) = inner.strip_prefix('!') {
                    out.push_str(exec.trim_start_matches(|c: char| c.is_ascii_digit()));
                    out.push(' ');
                }
                rest = after.get(j + 2..).unwrap_or("");
            }
            None => {
                // An unterminated comment hides the rest of a query from SQL: keep the
                // marker so comment rules see it.
                out.push_str("/*");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    *s = out;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        let mut out = String::new();
        normalize(s.as_bytes(), true, 3, &mut out);
        out
    }

    #[test]
    fn normalisation_undoes_evasions() {
        assert_eq!(norm("%253Cscript%253E"), "<script>");
        assert_eq!(norm("UNION/**/SELECT"), "union select");
        assert_eq!(norm("/*!50000UNION*/+SELECT"), "union select");
        assert_eq!(norm("%c0%ae%c0%ae/"), "../");
        assert_eq!(norm("&#x3C;img&#62;"), "<img>");
        assert_eq!(norm("scr%00ipt"), "script");
        assert_eq!(norm("%u003cscript"), "<script");
        assert_eq!(norm("ＳＥＬＥＣＴ"), "select");
        assert_eq!(norm("a\t\t  b"), "a b");
        assert_eq!(norm("..%5c..%5c"), "../../");
    }

    #[test]
    fn every_rule_compiles_alone() {
        for r in RULES {
            regex::Regex::new(r.pattern).unwrap_or_else(|e| panic!("{}: {e}", r.id));
            assert!(r.id.starts_with(category_name(r.category)), "{}", r.id);
        }
        let ids: std::collections::HashSet<_> = rule_ids().collect();
        assert_eq!(ids.len(), RULES.len(), "rule ids are unique");
    }

    fn waf(yaml: &str) -> Waf {
        let c: WafConfig = serde_yaml_ng::from_str(yaml).unwrap();
        Waf::new(c).unwrap()
    }

    fn first(v: Verdict) -> Option<(String, String)> {
        match v {
            Verdict::Matched(f) => f.first().map(|f| (f.rule.to_owned(), f.location.clone())),
            _ => None,
        }
    }

    #[test]
    fn finds_rule_and_location() {
        let w = waf("{}");
        let h = HeaderMap::new();
        let got =
            first(w.inspect("/a", "/a", Some("q=1%27%20OR%20%271%27%3D%271"), &h, None)).unwrap();
        assert_eq!(got, ("sqli-tautology".into(), "query:q".into()));
        assert!(first(w.inspect("/a", "/a", Some("q=O%27Brien"), &h, None)).is_none());
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        let body = Bytes::from(r#"{"post":{"comment":"<script>alert(1)</script>"}}"#);
        let got = first(w.inspect("/a", "/a", None, &h, Some(&body))).unwrap();
        assert_eq!(got, ("xss-script-tag".into(), "body:/post/comment".into()));
    }

    #[test]
    fn exclusions_and_selection() {
        let h = HeaderMap::new();
        let w = waf("exclusions: [{rules: [sqli], locations: ['query:q']}]");
        assert!(first(w.inspect("/a", "/a", Some("q=1+union+select+1"), &h, None)).is_none());
        assert!(first(w.inspect("/a", "/a", Some("x=1+union+select+1"), &h, None)).is_some());
        let w = waf("exclusions: [{path_prefixes: [/docs]}]");
        assert!(
            first(w.inspect("/docs/x", "/docs/x", Some("x=1+union+select+1"), &h, None)).is_none()
        );
        // Path prefixes end at a segment boundary.
        assert!(
            first(w.inspect(
                "/docsecret",
                "/docsecret",
                Some("x=1+union+select+1"),
                &h,
                None
            ))
            .is_some()
        );
        // Exclusions match the normalised path: a raw path that only looks like it is
        // under `/docs` is inspected.
        assert!(
            first(w.inspect(
                "/docs/../admin",
                "/admin",
                Some("x=1+union+select+1"),
                &h,
                None
            ))
            .is_some()
        );
        let w = waf("disabled_rules: [sqli-union-select]");
        assert!(first(w.inspect("/a", "/a", Some("x=1+union+select+1"), &h, None)).is_none());
        let w = waf("categories: [xss]");
        assert!(first(w.inspect("/a", "/a", Some("x=1+union+select+1"), &h, None)).is_none());
        let c: WafConfig = serde_yaml_ng::from_str("disabled_rules: [nope]").unwrap();
        assert_eq!(Waf::new(c).err().unwrap().0, "disabled_rules[0]");
        let w = waf("max_args: 2");
        assert!(matches!(
            w.inspect("/a", "/a", Some("a=1&b=2&c=3"), &h, None),
            Verdict::TooManyArgs
        ));
    }

    /// The CPU cost of inspecting a typical API request (a query with five parameters, three
    /// headers and a 1 KiB JSON body), printed for the report.
    #[test]
    fn cost_per_request() {
        let w = waf("{}");
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert(
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0"
                .parse()
                .unwrap(),
        );
        h.insert(
            "cookie",
            "session=abc123; theme=dark; lang=en".parse().unwrap(),
        );
        h.insert(
            "referer",
            "https://shop.example.com/search?q=shoes".parse().unwrap(),
        );
        let mut items = Vec::new();
        for i in 0..10 {
            items.push(serde_json::json!({"sku": format!("SKU-{i}"), "name": "Blue running shoe, size 42", "note": "Leave at the door, ring twice", "qty": i}));
        }
        let body =
            Bytes::from(serde_json::json!({"customer": "O'Brien", "items": items}).to_string());
        let query = "q=running+shoes&page=2&sort=price&min=10.50&max=99";
        let n = 2000;
        let start = std::time::Instant::now();
        for _ in 0..n {
            assert!(matches!(
                w.inspect("/api/orders", "/api/orders", Some(query), &h, Some(&body)),
                Verdict::Clean
            ));
        }
        let per = start.elapsed() / n;
        println!(
            "waf inspection: {per:?} per request ({} body bytes, {} rules)",
            body.len(),
            RULES.len()
        );
    }
}
