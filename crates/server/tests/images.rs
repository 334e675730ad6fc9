//! The gallery's files over HTTP: caching that follows the file, ids that stay with their
//! picture, and each gallery failure with its own status and hint (review findings on
//! `handlers/images.rs`, which cached every file as immutable and answered 500 to everything).

use crate::support::{tiny_models, PORT};
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use ld_core::datadir::DataDir;
use ld_core::gallery::{ImageRecord, NewImage};
use ld_core::infotext::Infotext;
use ld_server::{app, AppState, StateOptions};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime};
use tower::ServiceExt;

fn state(dir: &tempfile::TempDir) -> AppState {
    AppState::open(StateOptions {
        models_dirs: vec![tiny_models()],
        ..StateOptions::new(DataDir::open(Some(dir.path())).unwrap(), PORT)
    })
    .unwrap()
}

fn picture(s: &AppState, seed: u64) -> ImageRecord {
    let infotext = Infotext {
        prompt: format!("picture {seed}"),
        negative_prompt: String::new(),
        steps: 20,
        sampler: "Euler".into(),
        schedule: None,
        cfg_scale: 7.0,
        seed,
        width: 8,
        height: 8,
        model_hash: None,
        model: Some("sd1".into()),
        clip_skip: 1,
        extra: Vec::new(),
    };
    s.gallery()
        .save(NewImage {
            rgb: vec![(seed * 50) as u8; 8 * 8 * 3],
            width: 8,
            height: 8,
            infotext,
        })
        .unwrap()
}

/// Rewrites an image as an editor would, with a modified time ahead of its thumbnail's even
/// where file times are coarse.
fn edit(path: &std::path::Path, png: &[u8]) {
    std::fs::write(path, png).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
}

async fn send(
    s: &AppState,
    method: &str,
    path: &str,
    if_none_match: Option<&str>,
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut r = Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("127.0.0.1:{PORT}"))
        .header("x-ld-session", s.session_token());
    if let Some(tag) = if_none_match {
        r = r.header("if-none-match", tag);
    }
    let res = app(s.clone())
        .oneshot(r.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, headers, body)
}

async fn send_json(s: &AppState, method: &str, path: &str) -> (StatusCode, Value) {
    let (status, _, body) = send(s, method, path, None).await;
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, v)
}

fn etag(headers: &HeaderMap) -> String {
    headers["etag"].to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_and_thumbnails_are_revalidated_not_cached_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let rec = picture(&s, 1);
    let file_url = format!("/api/v1/images/{}/file", rec.id);
    let thumb_url = format!("/api/v1/images/{}/thumbnail", rec.id);

    let (status, headers, original) = send(&s, "GET", &file_url, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["cache-control"], "private, no-cache");
    let file_tag = etag(&headers);
    let (status, headers, _) = send(&s, "GET", &thumb_url, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["cache-control"], "private, no-cache");
    let thumb_tag = etag(&headers);

    // Unchanged: the browser's copy is still good, and no body is sent.
    for sent in [
        file_tag.clone(),
        format!("W/{file_tag}"),
        format!("\"other\", {file_tag}"),
    ] {
        let (status, headers, body) = send(&s, "GET", &file_url, Some(&sent)).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED, "{sent}");
        assert_eq!(etag(&headers), file_tag);
        assert!(body.is_empty());
    }
    let (status, _, body) = send(&s, "GET", &thumb_url, Some(&thumb_tag)).await;
    assert_eq!((status, body.len()), (StatusCode::NOT_MODIFIED, 0));

    // Edited outside the app: the same URLs now give the new picture.
    let edited = ld_core::image_file::encode_png(&[90; 16 * 4 * 3], 16, 4, "edited").unwrap();
    edit(&s.gallery().file_path(&rec), &edited);
    let (status, headers, body) = send(&s, "GET", &file_url, Some(&file_tag)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, edited);
    assert_ne!(body, original);
    assert_ne!(etag(&headers), file_tag);
    let (status, headers, body) = send(&s, "GET", &thumb_url, Some(&thumb_tag)).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(etag(&headers), thumb_tag);
    let thumb = image::load_from_memory(&body).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (16, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pictures_id_never_names_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    picture(&s, 1);
    let gone = picture(&s, 2);
    let (status, _) = send_json(&s, "DELETE", &format!("/api/v1/images/{}", gone.id)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, v) = send_json(&s, "DELETE", "/api/v1/trash").await;
    assert_eq!((status, &v["deleted"]), (StatusCode::OK, &json!(1)));
    let new = picture(&s, 3);
    assert_ne!(new.id, gone.id);
    for url in ["file", "thumbnail"] {
        let (status, v) = send_json(&s, "GET", &format!("/api/v1/images/{}/{url}", gone.id)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{url}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gallery_failures_answer_with_their_own_status_and_hint() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);

    // Restoring over a file that took the picture's place.
    let rec = picture(&s, 1);
    let in_gallery = s.gallery().file_path(&rec);
    s.gallery().trash(rec.id).unwrap();
    std::fs::write(&in_gallery, b"someone else's file").unwrap();
    let (status, v) = send_json(&s, "POST", &format!("/api/v1/images/{}/restore", rec.id)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        v,
        json!({
            "code": "conflict",
            "message": format!(
                "The picture cannot be restored: {} already exists.",
                in_gallery.display()
            ),
            "hint": "Move or rename that file, then restore the picture again.",
        })
    );

    // A file deleted outside the app.
    let rec = picture(&s, 2);
    let path = s.gallery().file_path(&rec);
    std::fs::remove_file(&path).unwrap();
    let missing = json!({
        "code": "not_found",
        "message": format!("The picture's file {} is missing.", path.display()),
        "hint": "It was moved or deleted outside the app. Restart the app to bring the gallery \
                 up to date.",
    });
    for (method, url) in [
        ("GET", format!("/api/v1/images/{}/file", rec.id)),
        ("GET", format!("/api/v1/images/{}/thumbnail", rec.id)),
        ("DELETE", format!("/api/v1/images/{}", rec.id)),
    ] {
        let (status, v) = send_json(&s, method, &url).await;
        assert_eq!(
            (status, &v),
            (StatusCode::NOT_FOUND, &missing),
            "{method} {url}"
        );
    }

    // A PNG whose pixel data is damaged: the file is served, a thumbnail cannot be made.
    let rec = picture(&s, 3);
    let path = s.gallery().file_path(&rec);
    let mut png = std::fs::read(&path).unwrap();
    let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
    for b in &mut png[idat + 6..idat + 12] {
        *b ^= 0x5a;
    }
    edit(&path, &png);
    let (status, _, body) = send(&s, "GET", &format!("/api/v1/images/{}/file", rec.id), None).await;
    assert_eq!((status, body), (StatusCode::OK, png));
    let (status, v) = send_json(&s, "GET", &format!("/api/v1/images/{}/thumbnail", rec.id)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        v,
        json!({
            "code": "invalid_request",
            "message": format!("The picture {} cannot be read.", path.display()),
            "hint": "The file is damaged. Open it in an image editor and save it again, or move \
                     it to the trash.",
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_starts_with_a_trashed_picture_copied_back_by_hand() {
    // Review finding: this made every start fail with "UNIQUE constraint failed".
    let dir = tempfile::tempdir().unwrap();
    let s = state(&dir);
    let rec = picture(&s, 1);
    let in_gallery = s.gallery().file_path(&rec);
    s.gallery().trash(rec.id).unwrap();
    let in_trash = s
        .gallery()
        .file_path(&s.gallery().get(rec.id).unwrap().unwrap());
    drop(s);
    std::fs::copy(&in_trash, &in_gallery).unwrap();
    let s = state(&dir);
    assert_eq!(s.startup_warnings(), &[] as &[String]);
    let (_, page) = send_json(&s, "GET", "/api/v1/images").await;
    assert_eq!(page["total"], 1, "{page}");
    let (_, page) = send_json(&s, "GET", "/api/v1/images?trash=true").await;
    assert_eq!(page["items"][0]["id"], rec.id, "{page}");
}
