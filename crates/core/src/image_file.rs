//! PNG files with their generation parameters: encoding with an A1111 `parameters` text chunk,
//! reading it back, and saving so that a crash never leaves half a file under the final name.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ImageFileError {
    #[error("the image is {got} bytes but {width}x{height} RGB needs {want}")]
    Size {
        width: u32,
        height: u32,
        got: usize,
        want: usize,
    },
    #[error("could not encode the PNG: {0}")]
    Encode(#[from] png::EncodingError),
    #[error("could not write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read the PNG {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: png::DecodingError,
    },
}

/// Encode 8-bit RGB pixels as PNG with the `parameters` chunk A1111 and Civitai read.
pub fn encode_png(
    rgb: &[u8],
    width: u32,
    height: u32,
    parameters: &str,
) -> Result<Vec<u8>, ImageFileError> {
    let want = width as usize * height as usize * 3;
    if rgb.len() != want {
        return Err(ImageFileError::Size {
            width,
            height,
            got: rgb.len(),
            want,
        });
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        // tEXt is Latin-1 only; prompts in other scripts go in an iTXt (UTF-8) chunk, as A1111 does.
        if parameters.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk("parameters".to_owned(), parameters.to_owned())?;
        } else {
            enc.add_itxt_chunk("parameters".to_owned(), parameters.to_owned())?;
        }
        let mut w = enc.write_header()?;
        w.write_image_data(rgb)?;
        w.finish()?;
    }
    Ok(out)
}

/// The `parameters` text of a PNG, if it has one.
pub fn read_parameters(png_bytes: &[u8]) -> Option<String> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let reader = decoder.read_info().ok()?;
    let info = reader.info();
    for t in &info.uncompressed_latin1_text {
        if t.keyword == "parameters" {
            return Some(t.text.clone());
        }
    }
    for t in &info.compressed_latin1_text {
        if t.keyword == "parameters" {
            return t.get_text().ok();
        }
    }
    for t in &info.utf8_text {
        if t.keyword == "parameters" {
            return t.get_text().ok();
        }
    }
    None
}

/// Width and height of a PNG file, from its header: the pixels are not read, so this stays cheap
/// for every file in a large folder.
pub fn read_png_size(path: &Path) -> Result<(u32, u32), ImageFileError> {
    let read_err = |source| ImageFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(|e| read_err(e.into()))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(read_err)?;
    let info = reader.info();
    Ok((info.width, info.height))
}

/// Write the PNG to `path` via a temp file, fsync and rename.
pub fn save_png(path: &Path, png_bytes: &[u8]) -> Result<(), ImageFileError> {
    crate::fsutil::write_atomic(path, png_bytes).map_err(|source| ImageFileError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_round_trip_latin1_and_unicode() {
        let rgb: Vec<u8> = (0..4 * 2 * 3).map(|i| i as u8).collect();
        for text in ["a cat\nSteps: 20, Seed: 1", "東京の猫 🐱\nSteps: 4"] {
            let png = encode_png(&rgb, 4, 2, text).unwrap();
            assert_eq!(read_parameters(&png).as_deref(), Some(text));
            let d = png::Decoder::new(std::io::Cursor::new(&png[..]));
            let mut r = d.read_info().unwrap();
            let mut buf = vec![0; r.output_buffer_size().unwrap()];
            r.next_frame(&mut buf).unwrap();
            assert_eq!(&buf[..rgb.len()], &rgb[..]);
        }
    }

    #[test]
    fn size_comes_from_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let png = encode_png(&[7; 5 * 3 * 3], 5, 3, "x").unwrap();
        // Only the header is needed: cut the pixel data short.
        std::fs::write(&path, &png[..png.len() - 20]).unwrap();
        assert_eq!(read_png_size(&path).unwrap(), (5, 3));
        std::fs::write(&path, b"not a png").unwrap();
        assert!(matches!(
            read_png_size(&path),
            Err(ImageFileError::Read { .. })
        ));
    }

    #[test]
    fn wrong_buffer_size_is_an_error() {
        let err = encode_png(&[0; 10], 4, 2, "x").unwrap_err();
        assert!(err.to_string().contains("needs 24"), "{err}");
    }
}
