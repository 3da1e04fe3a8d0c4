//! The UI's page frame, shared pieces and formats (maud templates: every value is escaped).

use std::fmt::Write as _;

use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use percent_encoding::{percent_decode_str, percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::Viewer;

/// The style sheet, embedded (the CSP allows styles from this origin only).
const STYLE: &str = include_str!("style.css");

/// Bytes of a path component kept as they are in a URL.
const PATH_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.');

pub(super) async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        STYLE,
    )
        .into_response()
}

/// A whole page: header with the viewer's links, then `body`.
pub(super) fn page(v: Option<&Viewer>, title: &str, body: &Markup) -> Response {
    let m = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · coffer" }
                link rel="stylesheet" href="/style.css";
            }
            body {
                header {
                    span.brand { "coffer" }
                    @if let Some(v) = v {
                        nav {
                            a href="/" { "Snapshots" }
                            a href="/policy" { "Policy" }
                            @if v.operator {
                                a href="/operator" { "Overview" }
                                a href="/operator/accounts" { "Accounts" }
                                a href="/operator/rules" { "Rules" }
                                a href="/operator/policies" { "Policies" }
                                a href="/operator/maintenance" { "Maintenance" }
                                a href="/operator/audit" { "Audit" }
                            }
                        }
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(v.csrf);
                            span.who { (v.identity) }
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    Html(m.into_string()).into_response()
}

/// An error page.
pub(super) fn failure(code: StatusCode, why: &str) -> Response {
    let body = html! {
        p.error { (why) }
        p { a href="/" { "Back to the snapshots" } }
    };
    let title = code.canonical_reason().unwrap_or("Error");
    let mut r = page(None, title, &body);
    *r.status_mut() = code;
    r
}

/// A hidden CSRF field for a form of `v`.
pub(super) fn csrf(v: &Viewer) -> Markup {
    html! { input type="hidden" name="csrf" value=(v.csrf); }
}

/// `done` or `error` notes carried by a redirect after a form.
pub(super) fn notes(done: Option<&str>, error: Option<&str>) -> Markup {
    html! {
        @if let Some(d) = done { p.done { (d) } }
        @if let Some(e) = error { p.error { (e) } }
    }
}

pub(super) fn bytes(n: u64) -> String {
    crate::access::quota::human_bytes(n)
}

/// Unix microseconds as `2026-12-03 05:30:00 UTC` (0: "never").
pub(super) fn when(us: i64) -> String {
    if us == 0 {
        return "never".into();
    }
    coffer_proto::when::format_us(us)
        .replacen('T', " ", 1)
        .replace('Z', " UTC")
}

/// Seconds as `1 h 02 min`, `3 min 04 s` or `12 s`.
pub(super) fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min {:02} s", secs / 60, secs % 60),
        _ => format!("{} h {:02} min", secs / 3600, secs % 3600 / 60),
    }
}

/// Bytes kept as they are in an RFC 8187 `filename*` value (attr-char, a safe subset).
const ATTR_SET: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');

/// A file name for `Content-Disposition: …; filename*=UTF-8''…`.
pub(super) fn enc_attr(name: &[u8]) -> String {
    percent_encode(name, ATTR_SET).to_string()
}

/// A snapshot path in a URL query (raw bytes, percent-encoded).
pub(super) fn enc(path: &[u8]) -> String {
    percent_encode(path, PATH_SET).to_string()
}

/// The raw bytes of query parameter `key` (percent-decoded; `+` is a space).
pub(super) fn query_bytes(query: Option<&str>, key: &str) -> Option<Vec<u8>> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| percent_decode_str(&v.replace('+', " ")).collect())
    })
}

/// A query parameter as text (lossy).
pub(super) fn query_text(query: Option<&str>, key: &str) -> Option<String> {
    query_bytes(query, key)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .filter(|s| !s.is_empty())
}

/// The components of a `/`-separated path (empty ones dropped; `.` and `..` refused by the
/// caller finding no such entry).
pub(super) fn components(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// `rwxr-xr-x` with the kind letter first.
pub(super) fn mode(kind: char, m: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(kind);
    for shift in [6, 3, 0] {
        let bits = (m >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// Whether `c` changes the direction text is shown in (it could disguise a name's end).
pub(super) fn bidi(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
}

/// Text for a raw name: invalid UTF-8 bytes as `\xFF`, control and direction characters as
/// `\u{…}`, so that two different names never look alike.
pub(super) fn name(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || bidi(c) || c == '\\' {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02X}");
        }
    }
    out
}

/// A non-breaking marker for an empty cell.
pub(super) fn dash() -> Markup {
    PreEscaped("&ndash;".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_survive_the_url_whatever_their_bytes() {
        for p in [
            &b"dir/with space/f\xffile"[..],
            b"a&b=c/%41/+plus",
            b"caf\xc3\xa9/x",
        ] {
            let url = format!("path={}&x=1", enc(p));
            assert!(
                !url[5..url.len() - 4].contains(['&', '=', ' ', '+']),
                "{url}"
            );
            assert_eq!(query_bytes(Some(&url), "path").as_deref(), Some(p));
        }
        assert_eq!(query_bytes(Some("a=1"), "path"), None);
        assert_eq!(components(b"/a//b/"), vec![b"a".to_vec(), b"b".to_vec()]);
        // Names that would look alike, or hide their end, are shown apart.
        assert_eq!(name(b"a\xff\xfeb"), "a\\xFF\\xFEb");
        assert_eq!(name("x\u{202e}txt.exe".as_bytes()), "x\\u{202e}txt.exe");
        assert_eq!(name(b"line\nbreak"), "line\\nbreak");
        assert_ne!(name(b"\xff"), name("\u{fffd}".as_bytes()));
    }

    #[test]
    fn formats_read_as_people_expect() {
        assert_eq!(mode('d', 0o755), "drwxr-xr-x");
        assert_eq!(mode('-', 0o640), "-rw-r-----");
        assert_eq!(duration(59), "59 s");
        assert_eq!(duration(61), "1 min 01 s");
        assert_eq!(duration(3720), "1 h 02 min");
        assert_eq!(when(0), "never");
        assert_eq!(when(1_000_000), "1970-01-01 00:00:01 UTC");
    }
}
