//! Where an image part's bytes come from: a `data:` URI (always) or an `http(s)://` URL (when the
//! operator enables fetching).
//!
//! A `data:` URI must be `data:image/<subtype>;base64,<payload>`. The declared subtype is not
//! trusted: the format is read from the bytes. The payload is standard base64 (`+` and `/`), with or
//! without `=` padding, and ASCII whitespace anywhere in it is skipped (tools such as `base64` wrap
//! their output at 76 columns). The URL-safe alphabet and percent-encoded (non-base64) data URIs
//! are refused.

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use reqwest::Url;

use crate::images::{Reason, Rejection};

/// The bytes of one image, before they are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// The base64 payload of a `data:` URI (whitespace not yet removed).
    Base64(String),
    Url(Url),
}

impl ImageSource {
    /// The label of the `source` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            ImageSource::Base64(_) => "data",
            ImageSource::Url(_) => "url",
        }
    }

    /// Reads an image part's `url`. `fetching`: whether `http(s)` URLs are fetched on this server.
    pub fn parse(mut url: String, fetching: bool) -> Result<ImageSource, Rejection> {
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase()).unwrap_or_default();
        match scheme.as_str() {
            "data" => {
                let comma = url
                    .find(',')
                    .ok_or_else(|| Rejection::new(Reason::BadUrl, "The data URI has no ',' before its payload."))?;
                let header = url["data:".len()..comma].to_ascii_lowercase();
                let mut fields = header.split(';');
                let media_type = fields.next().unwrap_or_default();
                if !media_type.starts_with("image/") {
                    return Err(Rejection::new(
                        Reason::BadUrl,
                        format!("The data URI's media type must be image/..., got '{media_type}'."),
                    ));
                }
                if fields.next_back() != Some("base64") {
                    return Err(Rejection::new(
                        Reason::BadUrl,
                        "Only base64 data URIs are accepted: data:image/png;base64,...",
                    ));
                }
                url.drain(..=comma);
                Ok(ImageSource::Base64(url))
            }
            "http" | "https" if !fetching => Err(Rejection::new(
                Reason::FetchDisabled,
                "This server does not fetch image URLs (its operator can enable it with --image-fetch); send \
                 the image inline as a data:image/...;base64 URI.",
            )),
            "http" | "https" => {
                let parsed = Url::parse(&url)
                    .map_err(|e| Rejection::new(Reason::BadUrl, format!("The image URL is not valid: {e}.")))?;
                Ok(ImageSource::Url(parsed))
            }
            _ => Err(Rejection::new(
                Reason::BadUrl,
                format!(
                    "Unsupported image URL{}: use a data:image/...;base64 URI{}.",
                    if scheme.is_empty() { String::new() } else { format!(" scheme '{scheme}'") },
                    if fetching { " or an http(s) URL" } else { "" }
                ),
            )),
        }
    }
}

/// Standard alphabet, padding optional.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes a data URI's payload, refusing one whose decoded size is over `max_bytes` before
/// decoding it.
pub fn decode_base64(payload: &str, max_bytes: usize) -> Result<Vec<u8>, Rejection> {
    let compact: std::borrow::Cow<'_, [u8]> = if payload.bytes().any(|b| b.is_ascii_whitespace()) {
        payload.bytes().filter(|b| !b.is_ascii_whitespace()).collect::<Vec<u8>>().into()
    } else {
        payload.as_bytes().into()
    };
    let digits = compact.iter().rev().skip_while(|&&b| b == b'=').count();
    let decoded_len = digits * 6 / 8;
    if decoded_len > max_bytes {
        return Err(Rejection::new(
            Reason::TooLarge,
            format!("The image is {decoded_len} bytes, more than the limit of {max_bytes} bytes."),
        ));
    }
    if digits == 0 {
        return Err(Rejection::new(Reason::BadBase64, "The data URI has no image data."));
    }
    BASE64
        .decode(&compact)
        .map_err(|e| Rejection::new(Reason::BadBase64, format!("The data URI's payload is not valid base64: {e}.")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason<T: std::fmt::Debug>(r: Result<T, Rejection>) -> Reason {
        r.expect_err("rejected").reason
    }

    #[test]
    fn data_uris() {
        let source = ImageSource::parse("data:image/png;base64,iVBORw0K".into(), false).expect("png");
        assert_eq!(source, ImageSource::Base64("iVBORw0K".into()));
        let source = ImageSource::parse("DATA:Image/JPEG;charset=x;BASE64,/9j/".into(), false).expect("case");
        assert_eq!(source, ImageSource::Base64("/9j/".into()));
        assert_eq!(reason(ImageSource::parse("data:text/plain;base64,aGk=".into(), false)), Reason::BadUrl);
        assert_eq!(reason(ImageSource::parse("data:image/png,%89PNG".into(), false)), Reason::BadUrl);
        assert_eq!(reason(ImageSource::parse("data:image/png;base64".into(), false)), Reason::BadUrl);
    }

    #[test]
    fn urls_by_scheme() {
        let e = ImageSource::parse("https://example.com/cat.png".into(), false).expect_err("disabled");
        assert_eq!(e.reason, Reason::FetchDisabled);
        assert!(e.message.contains("--image-fetch"), "{}", e.message);
        let url = ImageSource::parse("https://example.com/cat.png".into(), true).expect("enabled");
        assert_eq!(url.kind(), "url");
        for bad in ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x", "/tmp/a.png", "cat.png", ""] {
            assert_eq!(reason(ImageSource::parse(bad.into(), true)), Reason::BadUrl, "{bad}");
        }
        assert_eq!(reason(ImageSource::parse("http://".into(), true)), Reason::BadUrl);
    }

    #[test]
    fn base64_payloads() {
        assert_eq!(decode_base64("aGVsbG8=", 100).expect("padded"), b"hello");
        assert_eq!(decode_base64("aGVsbG8", 100).expect("unpadded"), b"hello");
        assert_eq!(decode_base64("aGVs\r\nbG8=\n", 100).expect("wrapped"), b"hello");
        assert_eq!(reason(decode_base64("aGVs!G8=", 100)), Reason::BadBase64);
        assert_eq!(reason(decode_base64("aGVsbG8_", 100)), Reason::BadBase64, "URL-safe alphabet");
        assert_eq!(reason(decode_base64("", 100)), Reason::BadBase64);
        assert_eq!(reason(decode_base64("aGVsbG8=", 4)), Reason::TooLarge);
        assert_eq!(decode_base64("aGVsbG8=", 5).expect("exactly the limit"), b"hello");
    }
}
