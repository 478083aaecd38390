//! Headless Chromium for the live view's test and figures: Debian's `chromium` (installed by
//! `scripts/test.sh` when missing), started by us in a process group of its own with a fresh
//! profile, driven over its DevTools protocol, and killed, group and all, whenever the
//! [`Chromium`] is dropped: on every exit path, panics included. Every wait is bounded.
//!
//! The protocol is spoken directly over its websocket (`async-tungstenite`): the five calls
//! used here are a few lines each, where a typed client (`chromiumoxide`) would add about six
//! minutes of compilation on CI's two cores for its generated protocol types.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use async_tungstenite::tokio::{ConnectStream, connect_async};
use async_tungstenite::tungstenite::Message;
use base64::Engine as _;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Mutex;

/// Where Debian's package puts the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// The longest any step waits (start, connect, a page call).
pub const STEP: Duration = Duration::from_secs(30);

/// The flags a headless browser needs on a machine with no network but loopback: no sandbox
/// (root), no GPU, nothing fetched in the background.
const FLAGS: [&str; 9] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
];

/// A running headless Chromium and the DevTools connection to it.
pub struct Chromium {
    devtools: Arc<DevTools>,
    pid: i32,
    _child: tokio::process::Child,
    _profile: tempfile::TempDir,
}

/// One tab, attached over the browser's DevTools connection (a flat session).
pub struct Page {
    devtools: Arc<DevTools>,
    session: String,
}

/// The browser's DevTools connection: one call at a time, each answered by its id (the
/// protocol's events, which nothing here asks for, are skipped).
struct DevTools {
    socket: Mutex<(WebSocketStream<ConnectStream>, u64)>,
}

impl DevTools {
    /// Calls `method` (in `session`, or on the browser) and returns its result.
    async fn call(&self, method: &str, params: Value, session: Option<&str>) -> Result<Value, BrowserError> {
        let mut guard = self.socket.lock().await;
        let (socket, next) = &mut *guard;
        *next += 1;
        let id = *next;
        let mut request = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            request["sessionId"] = json!(session);
        }
        let exchange = async {
            socket.send(Message::text(request.to_string())).await?;
            while let Some(message) = socket.next().await {
                let Message::Text(text) = message? else { continue };
                let mut reply: Value = serde_json::from_str(text.as_str())?;
                if reply["id"].as_u64() != Some(id) {
                    continue;
                }
                if let Some(error) = reply.get("error") {
                    return Err(BrowserError::DevTools(format!("{method}: {error}")));
                }
                return Ok(reply["result"].take());
            }
            Err(BrowserError::DevTools(format!("{method}: the connection closed")))
        };
        tokio::time::timeout(STEP, exchange).await.map_err(|_| BrowserError::Timeout("answer"))?
    }
}

/// Why the browser could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    #[error("chromium is not installed at {0} (scripts/test.sh installs Debian's package)")]
    Missing(PathBuf),
    #[error("chromium: {0}")]
    Io(#[from] std::io::Error),
    #[error("chromium did not {0} within {STEP:?}")]
    Timeout(&'static str),
    #[error("chromium's DevTools: {0}")]
    DevTools(String),
    #[error("chromium's DevTools connection: {0}")]
    WebSocket(#[from] async_tungstenite::tungstenite::Error),
    #[error("chromium's DevTools reply: {0}")]
    Json(#[from] serde_json::Error),
    #[error("chromium's screenshot: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("chromium exited before it listened: {0}")]
    Exited(String),
}

impl Chromium {
    /// Starts the browser (window `width` x `height`) and connects to it.
    ///
    /// # Errors
    /// When it is not installed, does not start or does not answer within [`STEP`].
    pub async fn start(width: u32, height: u32) -> Result<Self, BrowserError> {
        let path = PathBuf::from(CHROMIUM);
        if !path.exists() {
            return Err(BrowserError::Missing(path));
        }
        let profile = tempfile::tempdir()?;
        let mut command = tokio::process::Command::new(&path);
        command
            .args(FLAGS)
            .arg(format!("--window-size={width},{height}"))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let mut child = command.spawn()?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        let mut chromium = Guard(pid);
        let stderr = child.stderr.take().ok_or(BrowserError::Exited("no stderr".into()))?;
        let url =
            tokio::time::timeout(STEP, devtools_url(stderr)).await.map_err(|_| BrowserError::Timeout("listen"))??;
        let (socket, _) =
            tokio::time::timeout(STEP, connect_async(url)).await.map_err(|_| BrowserError::Timeout("connect"))??;
        chromium.0 = 0;
        let devtools = Arc::new(DevTools { socket: Mutex::new((socket, 0)) });
        Ok(Self { devtools, pid, _child: child, _profile: profile })
    }

    /// Opens `url` in a new page and waits until it has loaded.
    ///
    /// # Errors
    /// When the page does not open and load within [`STEP`].
    pub async fn open(&self, url: &str) -> Result<Page, BrowserError> {
        let target = self.devtools.call("Target.createTarget", json!({ "url": url }), None).await?;
        let attached = self
            .devtools
            .call("Target.attachToTarget", json!({ "targetId": target["targetId"], "flatten": true }), None)
            .await?;
        let session = attached["sessionId"].as_str().ok_or(BrowserError::DevTools("no session id".into()))?;
        let page = Page { devtools: self.devtools.clone(), session: session.to_owned() };
        let deadline = tokio::time::Instant::now() + STEP;
        // The tab starts on about:blank, complete at once: wait for the page asked for.
        let loaded = "location.href !== 'about:blank' && document.readyState === 'complete'";
        while Self::eval(&page, loaded).await?.as_bool() != Some(true) {
            if tokio::time::Instant::now() > deadline {
                return Err(BrowserError::Timeout("load"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(page)
    }

    /// Evaluates `expression` in `page` and returns its JSON value.
    ///
    /// # Errors
    /// When the page does not answer within [`STEP`] or the expression throws.
    pub async fn eval(page: &Page, expression: &str) -> Result<Value, BrowserError> {
        let params = json!({ "expression": expression, "returnByValue": true });
        let mut result = page.devtools.call("Runtime.evaluate", params, Some(&page.session)).await?;
        if let Some(thrown) = result.get("exceptionDetails") {
            return Err(BrowserError::DevTools(format!("{expression} threw {thrown}")));
        }
        Ok(result["result"]["value"].take())
    }

    /// A PNG of the whole page.
    ///
    /// # Errors
    /// When the page does not answer within [`STEP`].
    pub async fn screenshot(page: &Page) -> Result<Vec<u8>, BrowserError> {
        let metrics = page.devtools.call("Page.getLayoutMetrics", json!({}), Some(&page.session)).await?;
        let size = &metrics["cssContentSize"];
        let clip = json!({ "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1 });
        let params = json!({ "format": "png", "clip": clip, "captureBeyondViewport": true });
        let shot = page.devtools.call("Page.captureScreenshot", params, Some(&page.session)).await?;
        let data = shot["data"].as_str().ok_or(BrowserError::DevTools("no screenshot data".into()))?;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        drop(Guard(self.pid));
    }
}

/// Kills a browser's whole process group (renderers and helpers too) when dropped.
struct Guard(i32);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0 > 0 {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.0)])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The DevTools websocket address the browser prints on stderr once it listens.
async fn devtools_url(stderr: tokio::process::ChildStderr) -> Result<String, BrowserError> {
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    while let Some(line) = lines.next_line().await? {
        if let Some(url) = line.split("DevTools listening on ").nth(1) {
            // Keep draining stderr so the browser never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok(url.trim().to_owned());
        }
        seen.push(line);
    }
    Err(BrowserError::Exited(seen.join(" | ")))
}
