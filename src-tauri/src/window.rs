//! The app's windows: the main window showing the server's UI, the start-up error page, and the
//! navigation policy that keeps the window on our own server (other links open in the browser).

use tauri::webview::NewWindowResponse;
use tauri::{AppHandle, Manager, Runtime, Url, WebviewUrl, WebviewWindow, WebviewWindowBuilder};
use tauri_plugin_opener::OpenerExt;

pub const TITLE: &str = "Local Diffusers";
const MAIN: &str = "main";
const ERROR: &str = "error";
const SIZE: (f64, f64) = (1280.0, 820.0);
const MIN_SIZE: (f64, f64) = (800.0, 560.0);
/// Room left for the title bar when the screen is shorter than `SIZE` (sizes are of the content).
const TITLE_BAR: f64 = 40.0;

/// Opens the main window at the server's URL.
pub fn open_main<R: Runtime>(app: &AppHandle<R>, url: &str) -> anyhow::Result<()> {
    let url: Url = url.parse()?;
    let origin = url.origin();
    let external = app.clone();
    let popups = app.clone();
    let (width, height) = fit(work_area(app));
    let window = WebviewWindowBuilder::new(app, MAIN, WebviewUrl::External(url))
        .title(TITLE)
        .inner_size(width, height)
        .min_inner_size(MIN_SIZE.0, MIN_SIZE.1)
        .center()
        .on_navigation(move |to| {
            if to.origin() == origin || is_bundled_page(to) {
                return true;
            }
            open_in_browser(&external, to);
            false
        })
        .on_new_window(move |to, _features| {
            // `target="_blank"` links and window.open(): a browser tab, never a second app window.
            open_in_browser(&popups, &to);
            NewWindowResponse::Deny
        })
        .build()?;
    window.set_focus()?;
    Ok(())
}

/// Shows why the app could not start, on the bundled page (splash/index.html), which reads the
/// message from `window.__LD_STARTUP_ERROR__`. Replaces the main window if there is one.
pub fn open_error<R: Runtime>(app: &AppHandle<R>, error: &anyhow::Error) -> anyhow::Result<()> {
    let message = serde_json::to_string(&format!("{error:#}"))?;
    WebviewWindowBuilder::new(app, ERROR, WebviewUrl::App("index.html".into()))
        .title(format!("{TITLE} could not start"))
        .inner_size(720.0, 420.0)
        .center()
        .initialization_script(format!("window.__LD_STARTUP_ERROR__ = {message};"))
        .on_navigation(is_bundled_page)
        .build()?;
    if let Some(main) = app.get_webview_window(MAIN) {
        main.destroy()?;
    }
    Ok(())
}

/// Brings the app's window to the front (a second launch calls this through single-instance).
pub fn focus_existing<R: Runtime>(app: &AppHandle<R>) {
    let window: Option<WebviewWindow<R>> = app
        .get_webview_window(MAIN)
        .or_else(|| app.get_webview_window(ERROR));
    if let Some(window) = window {
        let _ = window.unminimize();
        let _ = window.show();
        if let Err(e) = window.set_focus() {
            tracing::warn!("could not focus the window: {e}");
        }
    }
}

/// The primary screen's area without panels, in logical pixels, if the platform says.
fn work_area<R: Runtime>(app: &AppHandle<R>) -> Option<(f64, f64)> {
    let monitor = app.primary_monitor().ok().flatten()?;
    let area = monitor
        .work_area()
        .size
        .to_logical::<f64>(monitor.scale_factor());
    Some((area.width, area.height))
}

/// The window's first size: `SIZE`, shrunk to fit a smaller screen (a 1366x768 laptop), never
/// below `MIN_SIZE`.
fn fit(screen: Option<(f64, f64)>) -> (f64, f64) {
    let Some((w, h)) = screen else {
        return SIZE;
    };
    (
        SIZE.0.min(w).max(MIN_SIZE.0),
        SIZE.1.min(h - TITLE_BAR).max(MIN_SIZE.1),
    )
}

/// Pages Tauri serves from build.frontendDist (tauri://localhost on Linux and macOS,
/// http(s)://tauri.localhost on Windows).
fn is_bundled_page(url: &Url) -> bool {
    match url.scheme() {
        "tauri" => url.host_str() == Some("localhost"),
        "http" | "https" => url.host_str() == Some("tauri.localhost"),
        _ => false,
    }
}

/// Only web and mail links leave the app; file:, javascript: and custom schemes are dropped.
fn opens_in_browser(url: &Url) -> bool {
    matches!(url.scheme(), "http" | "https" | "mailto")
}

fn open_in_browser<R: Runtime>(app: &AppHandle<R>, url: &Url) {
    if !opens_in_browser(url) {
        tracing::warn!("blocked navigation to {url}");
        return;
    }
    if let Err(e) = app.opener().open_url(url.as_str(), None::<&str>) {
        tracing::warn!("could not open {url} in the browser: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        s.parse().unwrap()
    }

    #[test]
    fn same_origin_is_port_and_host_exact() {
        let origin = url("http://127.0.0.1:7861/").origin();
        assert_eq!(url("http://127.0.0.1:7861/gallery?x=1").origin(), origin);
        assert_ne!(url("http://127.0.0.1:7860/").origin(), origin);
        assert_ne!(url("http://localhost:7861/").origin(), origin);
        assert_ne!(url("https://127.0.0.1:7861/").origin(), origin);
    }

    #[test]
    fn window_fits_small_screens_but_not_below_the_minimum() {
        assert_eq!(fit(None), SIZE);
        assert_eq!(fit(Some((2560.0, 1400.0))), SIZE);
        assert_eq!(fit(Some((1366.0, 728.0))), (1280.0, 688.0));
        assert_eq!(fit(Some((640.0, 480.0))), MIN_SIZE);
    }

    #[test]
    fn bundled_pages() {
        assert!(is_bundled_page(&url("tauri://localhost/index.html")));
        assert!(is_bundled_page(&url("http://tauri.localhost/index.html")));
        assert!(!is_bundled_page(&url("tauri://evil.example/")));
        assert!(!is_bundled_page(&url("http://localhost/")));
    }

    #[test]
    fn only_web_and_mail_links_leave_the_app() {
        assert!(opens_in_browser(&url("https://huggingface.co/stabilityai")));
        assert!(opens_in_browser(&url("mailto:someone@example.com")));
        assert!(!opens_in_browser(&url("file:///etc/passwd")));
        assert!(!opens_in_browser(&url("javascript:alert(1)")));
        assert!(!opens_in_browser(&url("smb://host/share")));
    }
}
