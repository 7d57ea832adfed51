//! The web pages Cinder serves, compiled into the binary (plain HTML, CSS and JS from
//! `host/static/`, no build step): the landing page a browser gets at `/`, the demo chat
//! at `/demo`, the admin page at `/admin`, and their assets under `/assets/` (the official
//! `phoenix` browser build among them, vendored at the version `tests/js` pins). Every
//! page is sent with a content security policy that allows only this server's own
//! scripts and sockets, and no framing. The pages hold no secret: the admin page asks for
//! the admin token and sends it with each API call.

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The policy every page is sent with.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const LANDING: &str = include_str!("../static/index.html");
const DEMO: &str = include_str!("../static/demo.html");
const ADMIN: &str = include_str!("../static/admin.html");

/// The assets: name, content type, body.
const ASSETS: [(&str, &str, &str); 5] = [
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../static/style.css"),
    ),
    (
        "demo.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/demo.js"),
    ),
    (
        "admin.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/admin.js"),
    ),
    (
        "phoenix.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/vendor/phoenix.min.js"),
    ),
    (
        "phoenix-LICENSE.md",
        "text/markdown; charset=utf-8",
        include_str!("../static/vendor/phoenix-LICENSE.md"),
    ),
];

/// Whether a request would rather have HTML (a browser) than JSON.
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"))
}

fn page(body: &'static str) -> Response {
    let mut response = (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// The landing page (what `/` gives a browser): links to the demo and the admin page.
pub fn landing() -> Response {
    page(LANDING)
}

/// `GET /demo`: the chat page.
pub async fn demo() -> Response {
    page(DEMO)
}

/// `GET /admin`: the admin page.
pub async fn admin() -> Response {
    page(ADMIN)
}

/// `GET /assets/{name}`: a page's style sheet or script.
pub async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}
