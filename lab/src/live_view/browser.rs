//! Headless Chromium for the live view's test and figures: Debian's `chromium` (installed by
//! `scripts/test.sh` when missing), started by us in a process group of its own with a fresh
//! profile, driven over the DevTools protocol (`chromiumoxide`), and killed, group and all,
//! whenever the [`Chromium`] is dropped: on every exit path, panics included. Every wait is
//! bounded.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chromiumoxide::{Browser, Page};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::task::AbortOnDropHandle;

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
    pub browser: Browser,
    pid: i32,
    _child: tokio::process::Child,
    _handler: AbortOnDropHandle<()>,
    _profile: tempfile::TempDir,
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
    DevTools(#[from] chromiumoxide::error::CdpError),
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
        let (browser, mut handler) =
            tokio::time::timeout(STEP, Browser::connect(url)).await.map_err(|_| BrowserError::Timeout("connect"))??;
        let handler = tokio::spawn(async move { while handler.next().await.is_some() {} });
        chromium.0 = 0;
        Ok(Self { browser, pid, _child: child, _handler: AbortOnDropHandle::new(handler), _profile: profile })
    }

    /// Opens `url` in a new page.
    ///
    /// # Errors
    /// When the page does not open within [`STEP`].
    pub async fn open(&self, url: &str) -> Result<Page, BrowserError> {
        Ok(tokio::time::timeout(STEP, self.browser.new_page(url))
            .await
            .map_err(|_| BrowserError::Timeout("open"))??)
    }

    /// Evaluates `expression` in `page` and returns its JSON value.
    ///
    /// # Errors
    /// When the page does not answer within [`STEP`] or the expression throws.
    pub async fn eval(page: &Page, expression: &str) -> Result<serde_json::Value, BrowserError> {
        let result = tokio::time::timeout(STEP, page.evaluate(expression))
            .await
            .map_err(|_| BrowserError::Timeout("evaluate"))??;
        Ok(result.value().cloned().unwrap_or(serde_json::Value::Null))
    }
}

impl Chromium {
    /// A PNG of the whole page.
    ///
    /// # Errors
    /// When the page does not answer within [`STEP`].
    pub async fn screenshot(page: &Page) -> Result<Vec<u8>, BrowserError> {
        let params = chromiumoxide::page::ScreenshotParams::builder().full_page(true).build();
        Ok(tokio::time::timeout(STEP, page.screenshot(params))
            .await
            .map_err(|_| BrowserError::Timeout("screenshot"))??)
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
