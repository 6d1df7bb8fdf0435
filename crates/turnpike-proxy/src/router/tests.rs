use http::{HeaderMap, HeaderName, HeaderValue, Method};
use turnpike_model::{ConfigError, RouteConfig};

use super::*;

/// A compiled table plus the route names, so cases can say which route wins.
struct Table {
    router: Router,
    names: Vec<String>,
}

/// Goes through a JSON value because `serde_yaml_ng` only accepts `!tag` syntax for
/// externally tagged enums (`paths: [{ exact: /x }]` fails with it directly).
fn routes(yaml: &str) -> Vec<RouteConfig> {
    let value: serde_json::Value = serde_yaml_ng::from_str(yaml).unwrap();
    serde_json::from_value(value).unwrap()
}

fn table(yaml: &str) -> Table {
    let routes = routes(yaml);
    let names = routes.iter().map(|r| r.name.clone()).collect();
    let router = match Router::compile(&routes) {
        Ok(r) => r,
        Err(e) => panic!("compile failed: {e:?}"),
    };
    Table { router, names }
}

fn compile_errors(yaml: &str) -> Vec<ConfigError> {
    match Router::compile(&routes(yaml)) {
        Ok(_) => panic!("expected compile errors for:\n{yaml}"),
        Err(e) => e,
    }
}

impl Table {
    fn run(
        &self,
        method: &str,
        host: Option<&str>,
        target: &str,
        headers: &[(&str, &str)],
    ) -> RouteResult {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let path = normalize_path(path).unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        self.router.route(&RequestView {
            host,
            path: &path,
            query,
            method: &method,
            headers: &map,
        })
    }

    /// Route name, `404`, or `405 GET,POST`.
    fn outcome(
        &self,
        method: &str,
        host: Option<&str>,
        target: &str,
        headers: &[(&str, &str)],
    ) -> String {
        match self.run(method, host, target, headers) {
            RouteResult::Matched(m) => self.names[m.index].clone(),
            RouteResult::NotFound => "404".to_owned(),
            RouteResult::MethodNotAllowed(ms) => {
                let ms: Vec<&str> = ms.iter().map(Method::as_str).collect();
                format!("405 {}", ms.join(","))
            }
        }
    }

    fn matched(&self, method: &str, host: Option<&str>, target: &str) -> RouteMatch {
        match self.run(method, host, target, &[]) {
            RouteResult::Matched(m) => m,
            other => panic!("{method} {host:?} {target}: expected a match, got {other:?}"),
        }
    }
}

/// (method, host, target, headers, expected outcome)
type Case<'a> = (
    &'a str,
    Option<&'a str>,
    &'a str,
    &'a [(&'a str, &'a str)],
    &'a str,
);

fn check(yaml: &str, cases: &[Case<'_>]) {
    let t = table(yaml);
    for (method, host, target, headers, want) in cases {
        let got = t.outcome(method, *host, target, headers);
        assert_eq!(
            &got, want,
            "{method} host={host:?} {target} headers={headers:?}"
        );
    }
}

// ---------------------------------------------------------------- hosts

#[test]
fn hosts() {
    check(
        r#"
- { name: exact, upstream: u, hosts: [API.Example.com] }
- { name: wild, upstream: u, hosts: ["*.example.com"] }
- { name: other, upstream: u, hosts: [other.test, "*.other.test"] }
- { name: any, upstream: u, paths: [{ prefix: /any }] }
"#,
        &[
            ("GET", Some("api.example.com"), "/", &[], "exact"),
            ("GET", Some("API.EXAMPLE.COM"), "/", &[], "exact"),
            ("GET", Some("api.example.com:8443"), "/", &[], "exact"),
            ("GET", Some("api.example.com."), "/", &[], "exact"),
            ("GET", Some("a.example.com"), "/", &[], "wild"),
            ("GET", Some("a.b.example.com"), "/", &[], "wild"),
            ("GET", Some("A.B.Example.COM:80"), "/", &[], "wild"),
            ("GET", Some("example.com"), "/", &[], "404"),
            ("GET", Some("xexample.com"), "/", &[], "404"),
            ("GET", Some(".example.com"), "/", &[], "404"),
            ("GET", Some("a..example.com"), "/", &[], "404"),
            ("GET", Some(".a.example.com"), "/", &[], "404"),
            ("GET", Some("other.test"), "/", &[], "other"),
            ("GET", Some("x.other.test"), "/", &[], "other"),
            ("GET", Some("nothing.test"), "/any/x", &[], "any"),
            ("GET", None, "/any", &[], "any"),
            ("GET", None, "/", &[], "404"),
            ("GET", Some(""), "/any", &[], "any"),
        ],
    );
}

#[test]
fn ipv6_and_odd_hosts_do_not_panic() {
    let t = table(
        r#"
- { name: v6, upstream: u, hosts: ["[::1]"] }
- { name: any, upstream: u }
"#,
    );
    for host in [
        "[::1]",
        "[::1]:8080",
        "::1",
        "[",
        "]",
        ":",
        ".",
        "..",
        "*.",
        "a..b",
        "é.example",
        "[:",
    ] {
        let got = t.outcome("GET", Some(host), "/", &[]);
        let want = if host.starts_with("[::1]") || host == "::1" {
            "v6"
        } else {
            "any"
        };
        assert_eq!(got, want, "host {host:?}");
    }
}

// ---------------------------------------------------------------- paths

#[test]
fn path_forms() {
    check(
        r#"
- { name: exact, upstream: u, paths: [{ exact: /exact }] }
- { name: prefix, upstream: u, paths: [{ prefix: /api }] }
- { name: prefix-slash, upstream: u, paths: [{ prefix: /svc/ }] }
- { name: template, upstream: u, paths: [{ template: "/users/{id}/posts/{post}" }] }
- { name: rest, upstream: u, paths: [{ template: "/files/{rest*}" }] }
- { name: regex, upstream: u, paths: [{ regex: "/items/(?P<n>[0-9]+)" }] }
- { name: root, upstream: u, paths: [{ exact: / }] }
"#,
        &[
            ("GET", None, "/exact", &[], "exact"),
            ("GET", None, "/exact/", &[], "404"),
            ("GET", None, "/exactly", &[], "404"),
            ("GET", None, "//exact", &[], "exact"),
            ("GET", None, "/x/../exact", &[], "exact"),
            ("GET", None, "/%65xact", &[], "exact"),
            ("GET", None, "/api", &[], "prefix"),
            ("GET", None, "/api/", &[], "prefix"),
            ("GET", None, "/api/x/y", &[], "prefix"),
            ("GET", None, "/apix", &[], "404"),
            ("GET", None, "/svc/", &[], "prefix-slash"),
            ("GET", None, "/svc/x", &[], "prefix-slash"),
            ("GET", None, "/svc", &[], "404"),
            ("GET", None, "/users/7/posts/9", &[], "template"),
            ("GET", None, "/users/7/posts", &[], "404"),
            ("GET", None, "/users/7/posts/9/x", &[], "404"),
            ("GET", None, "/users//posts/9", &[], "404"),
            ("GET", None, "/files", &[], "rest"),
            ("GET", None, "/files/", &[], "rest"),
            ("GET", None, "/files/a/b/c", &[], "rest"),
            ("GET", None, "/filesx", &[], "404"),
            ("GET", None, "/items/42", &[], "regex"),
            ("GET", None, "/items/42x", &[], "404"),
            ("GET", None, "/x/items/42", &[], "404"),
            ("GET", None, "/", &[], "root"),
        ],
    );
}

#[test]
fn params_are_captured_in_order() {
    let t = table(
        r#"
- { name: t, upstream: u, paths: [{ template: "/users/{id}/posts/{post}" }] }
- { name: rest, upstream: u, paths: [{ template: "/files/{kind}/{rest*}" }] }
- { name: re, upstream: u, paths: [{ regex: "/r/(?P<a>[a-z]+)-(\\d+)(?:-(?P<b>x))?" }] }
"#,
    );
    let p = |target: &str| t.matched("GET", None, target).params;
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    };
    assert_eq!(
        p("/users/ab%20c/posts/9"),
        pairs(&[("id", "ab%20c"), ("post", "9")])
    );
    assert_eq!(
        p("/files/img/a/b.png"),
        pairs(&[("kind", "img"), ("rest", "a/b.png")])
    );
    assert_eq!(p("/files/img"), pairs(&[("kind", "img"), ("rest", "")]));
    assert_eq!(p("/files/img/"), pairs(&[("kind", "img"), ("rest", "")]));
    assert_eq!(p("/r/abc-12"), pairs(&[("a", "abc")]));
    assert_eq!(p("/r/abc-12-x"), pairs(&[("a", "abc"), ("b", "x")]));
}

#[test]
fn several_paths_any_matches() {
    check(
        r#"
- { name: r, upstream: u, paths: [{ exact: /a }, { prefix: /b }, { template: "/c/{x}" }] }
"#,
        &[
            ("GET", None, "/a", &[], "r"),
            ("GET", None, "/b/1", &[], "r"),
            ("GET", None, "/c/1", &[], "r"),
            ("GET", None, "/d", &[], "404"),
        ],
    );
}

// ---------------------------------------------------------------- methods and predicates

#[test]
fn methods() {
    check(
        r#"
- { name: read, upstream: u, paths: [{ prefix: /r }], methods: [GET, head] }
- { name: write, upstream: u, paths: [{ prefix: /r }], methods: [POST, PUT] }
- { name: any, upstream: u, paths: [{ prefix: /any }] }
"#,
        &[
            ("GET", None, "/r", &[], "read"),
            ("HEAD", None, "/r", &[], "read"),
            ("POST", None, "/r", &[], "write"),
            ("PUT", None, "/r", &[], "write"),
            ("DELETE", None, "/r", &[], "405 GET,HEAD,POST,PUT"),
            ("PURGE", None, "/any", &[], "any"),
            ("DELETE", None, "/any", &[], "any"),
        ],
    );
}

#[test]
fn header_predicates() {
    check(
        r#"
- { name: eq, upstream: u, paths: [{ exact: /eq }], headers: [{ name: X-Env, equals: prod }] }
- { name: pre, upstream: u, paths: [{ exact: /pre }], headers: [{ name: x-ver, prefix: "v2" }] }
- { name: re, upstream: u, paths: [{ exact: /re }], headers: [{ name: user-agent, regex: "[Bb]ot" }] }
- { name: present, upstream: u, paths: [{ exact: /p }], headers: [{ name: x-key, present: true }] }
- { name: absent, upstream: u, paths: [{ exact: /a }], headers: [{ name: x-key, absent: true }] }
- name: all
  upstream: u
  paths: [{ exact: /all }]
  headers: [{ name: a, equals: "1" }, { name: b, equals: "2" }]
"#,
        &[
            ("GET", None, "/eq", &[("x-env", "prod")], "eq"),
            ("GET", None, "/eq", &[("X-ENV", "prod")], "eq"),
            ("GET", None, "/eq", &[("x-env", "Prod")], "404"),
            (
                "GET",
                None,
                "/eq",
                &[("x-env", "dev"), ("x-env", "prod")],
                "eq",
            ),
            ("GET", None, "/eq", &[], "404"),
            ("GET", None, "/pre", &[("x-ver", "v2.1")], "pre"),
            ("GET", None, "/pre", &[("x-ver", "v1")], "404"),
            ("GET", None, "/re", &[("user-agent", "Googlebot/2.1")], "re"),
            ("GET", None, "/re", &[("user-agent", "curl")], "404"),
            ("GET", None, "/p", &[("x-key", "")], "present"),
            ("GET", None, "/p", &[], "404"),
            ("GET", None, "/a", &[], "absent"),
            ("GET", None, "/a", &[("x-key", "1")], "404"),
            ("GET", None, "/all", &[("a", "1"), ("b", "2")], "all"),
            ("GET", None, "/all", &[("a", "1")], "404"),
        ],
    );
}

#[test]
fn query_predicates() {
    check(
        r#"
- { name: eq, upstream: u, paths: [{ exact: /eq }], query: [{ name: q, equals: "a b/c" }] }
- { name: pre, upstream: u, paths: [{ exact: /pre }], query: [{ name: v, prefix: "2" }] }
- { name: re, upstream: u, paths: [{ exact: /re }], query: [{ name: id, regex: "^[0-9]+$" }] }
- { name: present, upstream: u, paths: [{ exact: /p }], query: [{ name: debug, present: true }] }
- { name: absent, upstream: u, paths: [{ exact: /a }], query: [{ name: debug, absent: true }] }
- { name: encname, upstream: u, paths: [{ exact: /n }], query: [{ name: "a b", equals: "1" }] }
"#,
        &[
            ("GET", None, "/eq?q=a+b%2Fc", &[], "eq"),
            ("GET", None, "/eq?q=a%20b/c", &[], "eq"),
            ("GET", None, "/eq?x=1&q=a+b/c&y", &[], "eq"),
            ("GET", None, "/eq?q=zzz&q=a+b/c", &[], "eq"),
            ("GET", None, "/eq?q=a+b", &[], "404"),
            ("GET", None, "/eq?Q=a+b/c", &[], "404"),
            ("GET", None, "/eq", &[], "404"),
            ("GET", None, "/pre?v=2.0", &[], "pre"),
            ("GET", None, "/pre?v=1", &[], "404"),
            ("GET", None, "/re?id=123", &[], "re"),
            ("GET", None, "/re?id=12a", &[], "404"),
            ("GET", None, "/re?id=%31", &[], "re"),
            ("GET", None, "/p?debug", &[], "present"),
            ("GET", None, "/p?debug=", &[], "present"),
            ("GET", None, "/p?x=1&debug=1", &[], "present"),
            ("GET", None, "/p?debugx=1", &[], "404"),
            ("GET", None, "/p", &[], "404"),
            ("GET", None, "/a", &[], "absent"),
            ("GET", None, "/a?x=1", &[], "absent"),
            ("GET", None, "/a?debug=0", &[], "404"),
            ("GET", None, "/n?a+b=1", &[], "encname"),
            ("GET", None, "/n?a%20b=1", &[], "encname"),
            ("GET", None, "/eq?q=%zz&&=&q=a+b/c", &[], "eq"),
        ],
    );
}

#[test]
fn cookie_predicates() {
    check(
        r#"
- { name: eq, upstream: u, paths: [{ exact: /eq }], cookies: [{ name: session, equals: abc }] }
- { name: pre, upstream: u, paths: [{ exact: /pre }], cookies: [{ name: ab, prefix: "b" }] }
- { name: re, upstream: u, paths: [{ exact: /re }], cookies: [{ name: lang, regex: "^(en|fr)$" }] }
- { name: present, upstream: u, paths: [{ exact: /p }], cookies: [{ name: beta, present: true }] }
- { name: absent, upstream: u, paths: [{ exact: /a }], cookies: [{ name: beta, absent: true }] }
"#,
        &[
            ("GET", None, "/eq", &[("cookie", "session=abc")], "eq"),
            (
                "GET",
                None,
                "/eq",
                &[("cookie", "a=1; session=abc; b=2")],
                "eq",
            ),
            (
                "GET",
                None,
                "/eq",
                &[("cookie", "a=1"), ("cookie", "session=abc")],
                "eq",
            ),
            ("GET", None, "/eq", &[("cookie", "session=\"abc\"")], "eq"),
            ("GET", None, "/eq", &[("cookie", "Session=abc")], "404"),
            ("GET", None, "/eq", &[("cookie", "session=abcd")], "404"),
            ("GET", None, "/eq", &[("x-session", "session=abc")], "404"),
            ("GET", None, "/pre", &[("cookie", "ab=beta")], "pre"),
            ("GET", None, "/pre", &[("cookie", "ab=alpha")], "404"),
            ("GET", None, "/re", &[("cookie", "lang=fr")], "re"),
            ("GET", None, "/re", &[("cookie", "lang=de")], "404"),
            ("GET", None, "/p", &[("cookie", "beta=")], "present"),
            ("GET", None, "/p", &[("cookie", "x=1;beta=1")], "present"),
            ("GET", None, "/p", &[("cookie", "betax=1")], "404"),
            ("GET", None, "/a", &[], "absent"),
            ("GET", None, "/a", &[("cookie", "x=1")], "absent"),
            ("GET", None, "/a", &[("cookie", "beta=1")], "404"),
        ],
    );
}

// ---------------------------------------------------------------- precedence

#[test]
fn precedence() {
    // Each table: the same request, and the route that must win.
    let cases: &[(&str, &str, Option<&str>, &str)] = &[
        (
            "priority beats specificity",
            r#"
- { name: exact, upstream: u, paths: [{ exact: /a/b }] }
- { name: loose, upstream: u, priority: 10 }
"#,
            None,
            "/a/b",
        ),
        (
            "negative priority loses to default",
            r#"
- { name: low, upstream: u, priority: -1, paths: [{ exact: /a }] }
- { name: default, upstream: u, paths: [{ prefix: / }] }
"#,
            None,
            "/a",
        ),
        (
            "exact beats prefix",
            r#"
- { name: prefix, upstream: u, paths: [{ prefix: /a }] }
- { name: exact, upstream: u, paths: [{ exact: /a/b }] }
"#,
            None,
            "/a/b",
        ),
        (
            "longer prefix beats shorter",
            r#"
- { name: short, upstream: u, paths: [{ prefix: /a }] }
- { name: long, upstream: u, paths: [{ prefix: /a/b }] }
"#,
            None,
            "/a/b/c",
        ),
        (
            "template beats regex beats prefix",
            r#"
- { name: prefix, upstream: u, paths: [{ prefix: /u }] }
- { name: regex, upstream: u, paths: [{ regex: "/u/.*" }] }
- { name: template, upstream: u, paths: [{ template: "/u/{id}" }] }
"#,
            None,
            "/u/1",
        ),
        (
            "regex beats prefix",
            r#"
- { name: prefix, upstream: u, paths: [{ prefix: /u }] }
- { name: regex, upstream: u, paths: [{ regex: "/u/.*" }] }
"#,
            None,
            "/u/1",
        ),
        (
            "template with more literal segments wins",
            r#"
- { name: one, upstream: u, paths: [{ template: "/u/{id}/{sub}" }] }
- { name: two, upstream: u, paths: [{ template: "/u/{id}/posts" }] }
"#,
            None,
            "/u/1/posts",
        ),
        (
            "template with fewer captures wins",
            r#"
- { name: rest, upstream: u, paths: [{ template: "/u/{a}/{rest*}" }] }
- { name: one, upstream: u, paths: [{ template: "/u/{a}" }] }
"#,
            None,
            "/u/1",
        ),
        (
            "any path loses to prefix /",
            r#"
- { name: none, upstream: u }
- { name: root, upstream: u, paths: [{ prefix: / }] }
"#,
            None,
            "/x",
        ),
        (
            "exact host beats wildcard",
            r#"
- { name: wild, upstream: u, hosts: ["*.example.com"], paths: [{ exact: /x }] }
- { name: exact, upstream: u, hosts: [api.example.com] }
"#,
            Some("api.example.com"),
            "/x",
        ),
        (
            "wildcard with more labels wins",
            r#"
- { name: short, upstream: u, hosts: ["*.example.com"] }
- { name: long, upstream: u, hosts: ["*.eu.example.com"] }
"#,
            Some("a.eu.example.com"),
            "/",
        ),
        (
            "wildcard beats any host",
            r#"
- { name: any, upstream: u, paths: [{ exact: /x }] }
- { name: wild, upstream: u, hosts: ["*.example.com"] }
"#,
            Some("a.example.com"),
            "/x",
        ),
        (
            "more constraints win",
            r#"
- { name: plain, upstream: u, paths: [{ prefix: /a }] }
- { name: get, upstream: u, paths: [{ prefix: /a }], methods: [GET] }
- { name: get-hdr, upstream: u, paths: [{ prefix: /a }], methods: [GET], headers: [{ name: x, present: true }] }
"#,
            None,
            "/a",
        ),
        (
            "tie goes to file order",
            r#"
- { name: first, upstream: u, paths: [{ prefix: /a }] }
- { name: second, upstream: u, paths: [{ prefix: /a }] }
"#,
            None,
            "/a",
        ),
        (
            "several hosts: the matched host ranks the route",
            r#"
- { name: wild, upstream: u, hosts: ["*.example.com"] }
- { name: both, upstream: u, hosts: ["*.example.com", "api.example.com"] }
- { name: wild2, upstream: u, hosts: ["*.example.com"] }
"#,
            Some("api.example.com"),
            "/",
        ),
        (
            "several paths: the matched path ranks the route",
            r#"
- { name: prefix, upstream: u, paths: [{ prefix: /a }] }
- { name: multi, upstream: u, paths: [{ prefix: / }, { exact: /a/b }] }
"#,
            None,
            "/a/b",
        ),
    ];
    let expected = [
        "loose", "default", "exact", "long", "template", "regex", "two", "one", "root", "exact",
        "long", "wild", "get-hdr", "first", "both", "multi",
    ];
    for ((what, yaml, host, path), want) in cases.iter().zip(expected) {
        let t = table(yaml);
        let got = t.outcome("GET", *host, path, &[("x", "1")]);
        assert_eq!(got, want, "{what}");
        // Order in the file must not matter except for ties: reverse and check again.
        if *what != "tie goes to file order" {
            let mut rs = routes(yaml);
            rs.reverse();
            let names: Vec<String> = rs.iter().map(|r| r.name.clone()).collect();
            let t = Table {
                router: Router::compile(&rs).unwrap(),
                names,
            };
            let got = t.outcome("GET", *host, path, &[("x", "1")]);
            assert_eq!(got, want, "{what} (reversed)");
        }
    }
}

#[test]
fn several_paths_the_less_specific_path_does_not_lift_the_route() {
    // `multi` matches /a/x through its prefix `/` only; the longer prefix `/a` wins then.
    check(
        r#"
- { name: multi, upstream: u, paths: [{ prefix: / }, { exact: /a/b }] }
- { name: prefix, upstream: u, paths: [{ prefix: /a }] }
"#,
        &[
            ("GET", None, "/a/x", &[], "prefix"),
            ("GET", None, "/a/b", &[], "multi"),
        ],
    );
}

#[test]
fn big_table_uses_the_host_index() {
    let mut yaml = String::new();
    for i in 0..2000 {
        yaml.push_str(&format!(
            "- {{ name: r{i}, upstream: u, hosts: [h{i}.example.com], paths: [{{ prefix: /p }}] }}\n"
        ));
    }
    yaml.push_str("- { name: wild, upstream: u, hosts: [\"*.example.com\"] }\n");
    let t = table(&yaml);
    assert_eq!(
        t.outcome("GET", Some("h1234.example.com"), "/p/x", &[]),
        "r1234"
    );
    assert_eq!(
        t.outcome("GET", Some("h1234.example.com"), "/q", &[]),
        "wild"
    );
    assert_eq!(t.outcome("GET", Some("zzz.example.com"), "/p", &[]), "wild");
}

// ---------------------------------------------------------------- 405 / 404

#[test]
fn method_not_allowed_versus_not_found() {
    check(
        r#"
- { name: get, upstream: u, paths: [{ exact: /a }], methods: [GET, DELETE] }
- { name: post, upstream: u, paths: [{ prefix: /a }], methods: [POST, GET] }
- { name: hdr, upstream: u, paths: [{ exact: /h }], methods: [PUT], headers: [{ name: x, present: true }] }
- { name: host, upstream: u, hosts: [h.test], paths: [{ exact: /host }], methods: [PATCH] }
"#,
        &[
            ("PUT", None, "/a", &[], "405 DELETE,GET,POST"),
            ("PUT", None, "/a/x", &[], "405 GET,POST"),
            ("GET", None, "/b", &[], "404"),
            // Predicates must hold for the route to count towards 405.
            ("GET", None, "/h", &[], "404"),
            ("GET", None, "/h", &[("x", "1")], "405 PUT"),
            // And the host must match.
            ("GET", Some("other.test"), "/host", &[], "404"),
            ("GET", Some("h.test"), "/host", &[], "405 PATCH"),
        ],
    );
}

#[test]
fn a_full_match_wins_over_405() {
    check(
        r#"
- { name: strict, upstream: u, priority: 5, paths: [{ exact: /a }], methods: [POST] }
- { name: any, upstream: u, paths: [{ prefix: / }] }
"#,
        &[
            ("GET", None, "/a", &[], "any"),
            ("POST", None, "/a", &[], "strict"),
        ],
    );
}

#[test]
fn empty_table_is_not_found() {
    let t = table("[]");
    assert_eq!(t.outcome("GET", Some("x"), "/", &[]), "404");
}

#[test]
fn route_tolerates_unnormalised_input() {
    // The proxy always normalises, but `route` must not panic if it ever does not.
    let t = table(
        r#"
- { name: t, upstream: u, paths: [{ template: "/a/{x}" }], rewrite: { template: "/b/{x}" } }
- { name: s, upstream: u, paths: [{ prefix: /s }], rewrite: { strip_prefix: true } }
- { name: r, upstream: u, paths: [{ regex: ".*" }] }
"#,
    );
    let headers = HeaderMap::new();
    for path in [
        "",
        "a",
        "//",
        "/a/",
        "/s",
        "/s/../..",
        "\u{e9}",
        "/a/\u{e9}",
    ] {
        let _ = t.router.route(&RequestView {
            host: Some("x"),
            path,
            query: Some("&&=&%%"),
            method: &Method::GET,
            headers: &headers,
        });
    }
}

// ---------------------------------------------------------------- normalisation

#[test]
fn normalisation_cases() {
    let ok: &[(&str, &str)] = &[
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a/../admin", "/admin"),
        ("//admin", "/admin"),
        ("/%2e%2e/admin", "/admin"),
        ("/%2E%2e/admin", "/admin"),
        ("/a/./b/", "/a/b/"),
        ("/%41", "/A"),
        ("/a%20b", "/a%20b"),
        ("/a%3ab", "/a%3Ab"),
        ("/%c3%a9", "/%C3%A9"),
        ("/%7e%5f%2d%2E", "/~_-."),
        ("/..", "/"),
        ("/../../x", "/x"),
        ("/a/b/..", "/a/"),
        ("/a/b/../", "/a/"),
        ("/a/.", "/a/"),
        ("/a/b/../../..", "/"),
        ("/a//b///c/", "/a/b/c/"),
        ("/.well-known/x", "/.well-known/x"),
        ("/a/...", "/a/..."),
        ("/a/..b", "/a/..b"),
        ("/a/%2e", "/a/"),
        ("/a/.%2e/b", "/b"),
        ("/%25", "/%25"),
        ("/%252e%252e/", "/%252e%252e/"),
        ("/\u{e9}", "/\u{e9}"),
        ("/a b", "/a b"),
    ];
    for (input, want) in ok {
        assert_eq!(normalize_path(input).as_deref(), Ok(*want), "{input:?}");
    }
    let refused: &[&str] = &[
        "",
        "a/b",
        "*",
        "/admin%2f..",
        "/a%2Fb",
        "/a%5cb",
        "/a%5Cb",
        "/a\\b",
        "/a%00",
        "/a\0b",
        "/a%zz",
        "/a%4",
        "/a%",
        "/a%%41",
        "/a\nb",
        "/a\rb",
        "/a\tb",
        "/a\u{7f}",
        "/a\u{85}",
        "/a%0d%0a",
        "/a%7F",
        "/%e9%",
    ];
    for input in refused {
        assert!(
            normalize_path(input).is_err(),
            "{input:?} should be refused"
        );
    }
    assert_eq!(
        normalize_path("/admin%2f.."),
        Err(PathError("encoded slash"))
    );
}

#[test]
fn normalisation_is_idempotent_and_clean() {
    const ALPHABET: &[&str] = &[
        "/", "/", "/", ".", ".", "a", "b", "%2e", "%2E", "%41", "%2f", "%5c", "%20", "%e9", "%",
        "%4", "%zz", "~", "\\", " ", "é", "%00", "..", "//", "/./", "/../",
    ];
    let mut rng = fastrand::Rng::with_seed(0x0701_771e);
    let mut accepted = 0;
    for _ in 0..20_000 {
        let mut raw = String::from("/");
        for _ in 0..rng.usize(0..12) {
            raw.push_str(ALPHABET[rng.usize(0..ALPHABET.len())]);
        }
        let Ok(once) = normalize_path(&raw) else {
            continue;
        };
        accepted += 1;
        assert_eq!(normalize_path(&once).as_ref(), Ok(&once), "{raw:?}");
        assert!(once.starts_with('/'), "{raw:?} -> {once:?}");
        for bad in ["//", "/./", "/../"] {
            assert!(!once.contains(bad), "{raw:?} -> {once:?}");
        }
        assert!(
            !once.ends_with("/.") && !once.ends_with("/.."),
            "{raw:?} -> {once:?}"
        );
        assert!(!once.contains('\\'), "{raw:?} -> {once:?}");
        // Escapes left in the output are upper-case and never an unreserved character.
        let mut rest = once.as_str();
        while let Some(i) = rest.find('%') {
            let hex = &rest[i + 1..i + 3];
            assert!(
                hex.bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
            );
            let byte = u8::from_str_radix(hex, 16).unwrap();
            assert!(!(byte.is_ascii_alphanumeric() || b"-._~/\\".contains(&byte)));
            rest = &rest[i + 3..];
        }
    }
    assert!(accepted > 1000, "generator too hostile: {accepted}");
}

// ---------------------------------------------------------------- rewrites

#[test]
fn rewrites() {
    let t = table(
        r#"
- { name: none, upstream: u, paths: [{ prefix: /none }] }
- { name: strip, upstream: u, paths: [{ prefix: /api }], rewrite: { strip_prefix: true } }
- { name: strip-slash, upstream: u, paths: [{ prefix: /svc/ }], rewrite: { strip_prefix: true } }
- { name: strip-root, upstream: u, paths: [{ prefix: / }], hosts: [root.test], rewrite: { strip_prefix: true } }
- { name: strip-false, upstream: u, paths: [{ prefix: /keep }], rewrite: { strip_prefix: false } }
- name: tpl
  upstream: u
  paths: [{ template: "/users/{id}" }, { regex: "/u/(?P<id>[0-9]+)" }]
  rewrite: { template: "/v2/users/{id}" }
- name: tpl-rest
  upstream: u
  paths: [{ template: "/static/{rest*}" }]
  rewrite: { template: "/assets/{rest*}/" }
- name: re
  upstream: u
  paths: [{ prefix: /old }]
  rewrite: { regex: { pattern: "^/old/([a-z]+)", replacement: "/new/${1}" } }
- name: re-noslash
  upstream: u
  paths: [{ prefix: /bare }]
  rewrite: { regex: { pattern: "^/bare/", replacement: "" } }
- name: re-dots
  upstream: u
  paths: [{ prefix: /dots }]
  rewrite: { regex: { pattern: "^/dots/x", replacement: "/in/" } }
- { name: add, upstream: u, paths: [{ prefix: /add }], rewrite: { add_prefix: /svc } }
- { name: add-slash, upstream: u, paths: [{ prefix: /adds }], rewrite: { add_prefix: /svc/ } }
"#,
    );
    let cases: &[(Option<&str>, &str, &str)] = &[
        (None, "/none/a/../b", "/none/b"),
        (None, "/api", "/"),
        (None, "/api/", "/"),
        (None, "/api/x", "/x"),
        (None, "/api/x/y/", "/x/y/"),
        (None, "/svc/", "/"),
        (None, "/svc/x", "/x"),
        (Some("root.test"), "/a/b", "/a/b"),
        (Some("root.test"), "/", "/"),
        (None, "/keep/x", "/keep/x"),
        (None, "/users/42", "/v2/users/42"),
        (None, "/u/42", "/v2/users/42"),
        (None, "/static/css/a.css", "/assets/css/a.css/"),
        (None, "/static", "/assets/"),
        (None, "/old/abc/def", "/new/abc/def"),
        (None, "/old/123", "/old/123"),
        (None, "/bare/x/y", "/x/y"),
        // The replacement would climb out of `/in`; cleaning keeps it at the root.
        (None, "/dots/x..", "/"),
        (None, "/add", "/svc/add"),
        (None, "/add/x/", "/svc/add/x/"),
        (None, "/adds/x", "/svc/adds/x"),
    ];
    for (host, target, want) in cases {
        let m = t.matched("GET", *host, target);
        assert_eq!(m.forward_path, *want, "{target}");
    }
}

#[test]
fn forwarded_paths_are_always_clean() {
    let t = table(
        r#"
- { name: strip, upstream: u, hosts: [s.test], paths: [{ prefix: /a }], rewrite: { strip_prefix: true } }
- { name: tpl, upstream: u, hosts: [t.test], paths: [{ template: "/{x}/{rest*}" }], rewrite: { template: "/v/{rest}/{x}" } }
- name: re
  upstream: u
  hosts: [r.test]
  rewrite: { regex: { pattern: "^/([^/]*)", replacement: "${1}/" } }
- { name: add, upstream: u, hosts: [p.test], rewrite: { add_prefix: /svc/ } }
- { name: none, upstream: u }
"#,
    );
    const PIECES: &[&str] = &["/", "/", "a", ".", "..", "%2e", "x.", "~", "%20", "//"];
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..5_000 {
        let mut raw = String::from("/");
        for _ in 0..rng.usize(0..10) {
            raw.push_str(PIECES[rng.usize(0..PIECES.len())]);
        }
        for host in ["s.test", "t.test", "r.test", "p.test", "other.test"] {
            let RouteResult::Matched(m) = t.run("GET", Some(host), &raw, &[]) else {
                continue;
            };
            let f = &m.forward_path;
            assert!(f.starts_with('/'), "{host} {raw:?} -> {f:?}");
            for bad in ["//", "/./", "/../"] {
                assert!(!f.contains(bad), "{host} {raw:?} -> {f:?}");
            }
            assert!(
                !f.ends_with("/.") && !f.ends_with("/.."),
                "{host} {raw:?} -> {f:?}"
            );
        }
    }
}

// ---------------------------------------------------------------- compile errors

#[test]
fn compile_errors_point_at_the_entry() {
    let cases: &[(&str, &str)] = &[
        (
            "- { name: a, upstream: u, paths: [{ regex: \"(\" }] }",
            "routes[0].paths[0]",
        ),
        (
            "- { name: a, upstream: u, paths: [{ regex: \"/a)|(/b\" }] }",
            "routes[0].paths[0]",
        ),
        (
            "- { name: a, upstream: u, paths: [{ exact: /x }, { template: \"/a/{\" }] }",
            "routes[0].paths[1]",
        ),
        (
            "- { name: a, upstream: u, paths: [{ template: \"/a/{x}/{x}\" }] }",
            "routes[0].paths[0]",
        ),
        (
            "- { name: a, upstream: u, paths: [{ template: \"/a/{x*}/b\" }] }",
            "routes[0].paths[0]",
        ),
        (
            "- { name: a, upstream: u, paths: [{ template: \"/a/x{y}\" }] }",
            "routes[0].paths[0]",
        ),
        (
            "- { name: a, upstream: u, paths: [{ template: \"/a/{}\" }] }",
            "routes[0].paths[0]",
        ),
        (
            "- { name: a, upstream: u, paths: [{ prefix: \"/a%2fb\" }] }",
            "routes[0].paths[0]",
        ),
        (
            "- { name: a, upstream: u, paths: [{ exact: \"a\" }] }",
            "routes[0].paths[0]",
        ),
        (
            "- { name: a, upstream: u }\n- { name: b, upstream: u, headers: [{ name: x, regex: \"[\" }] }",
            "routes[1].headers[0].regex",
        ),
        (
            "- { name: a, upstream: u, headers: [{ name: \"bad name\", equals: x }] }",
            "routes[0].headers[0].name",
        ),
        (
            "- { name: a, upstream: u, query: [{ name: q, regex: \"(\" }] }",
            "routes[0].query[0].regex",
        ),
        (
            "- { name: a, upstream: u, cookies: [{ name: c, present: false }] }",
            "routes[0].cookies[0]",
        ),
        (
            "- { name: a, upstream: u, methods: [GET, \"B@D\"] }",
            "routes[0].methods[1]",
        ),
        (
            "- { name: a, upstream: u, hosts: [ok.test, \"a.*.test\"] }",
            "routes[0].hosts[1]",
        ),
        (
            "- { name: a, upstream: u, hosts: [\"*\"] }",
            "routes[0].hosts[0]",
        ),
        (
            "- { name: a, upstream: u, paths: [{ exact: /x }], rewrite: { template: \"/y/{id}\" } }",
            "routes[0].rewrite.template",
        ),
        (
            "- { name: a, upstream: u, paths: [{ template: \"/x/{id}\" }, { prefix: /z }], rewrite: { template: \"/y/{id}\" } }",
            "routes[0].rewrite.template",
        ),
        (
            "- { name: a, upstream: u, rewrite: { template: \"/y/{id}\" } }",
            "routes[0].rewrite.template",
        ),
        (
            "- { name: a, upstream: u, paths: [{ template: \"/x/{id}\" }], rewrite: { template: \"/y/{id\" } }",
            "routes[0].rewrite.template",
        ),
        (
            "- { name: a, upstream: u, paths: [{ template: \"/x/{id}\" }], rewrite: { template: \"y/{id}\" } }",
            "routes[0].rewrite.template",
        ),
        (
            "- { name: a, upstream: u, rewrite: { regex: { pattern: \"(\", replacement: x } } }",
            "routes[0].rewrite.regex.pattern",
        ),
        (
            "- { name: a, upstream: u, paths: [{ exact: /x }], rewrite: { strip_prefix: true } }",
            "routes[0].rewrite.strip_prefix",
        ),
        (
            "- { name: a, upstream: u, rewrite: { add_prefix: \"svc\" } }",
            "routes[0].rewrite.add_prefix",
        ),
    ];
    for (yaml, path) in cases {
        let errors = compile_errors(yaml);
        assert!(
            errors.iter().any(|e| e.path == *path),
            "{yaml}: wanted an error at {path}, got {errors:?}"
        );
        assert!(errors.iter().all(|e| !e.message.is_empty()));
    }
}

#[test]
fn all_errors_are_reported_at_once() {
    let errors = compile_errors(
        r#"
- { name: a, upstream: u, paths: [{ regex: "(" }, { template: "/{" }] }
- { name: b, upstream: u, headers: [{ name: x, regex: "[" }] }
"#,
    );
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "routes[0].paths[0]",
            "routes[0].paths[1]",
            "routes[1].headers[0].regex"
        ]
    );
}

#[test]
fn router_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Router>();
}
