//! Images through the chat API, over real HTTP, with a recording coordinator behind the gateway:
//! what the coordinator receives (the expanded prompt, the tiles, in prompt order), usage, and the
//! 400 of every bad image, naming its content part.

mod support;

use epserve_gateway::ImageConfig;
use epserve_testkit::fixtures;
use serde_json::{Value, json};
use support::{Harness, data_uri, gateway_prompt, golden_expansion, image_part, images, png, text_part, vision_cases};

const PATCH: u32 = 495;
const IMAGE: u32 = 498;

/// The golden tiles as uint8: the golden `pixel_values` are bf16 of `(u8 / 255 − 0.5) / 0.5`.
fn golden_u8(values: &[f32]) -> Vec<u8> {
    values.iter().map(|v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base64_png_reaches_the_coordinator_as_the_golden_prompt_and_tiles() {
    let gw = Harness::start(fixtures::TINY_LLAMA4, images(None)).await;
    for (n, case) in vision_cases().iter().enumerate() {
        let messages = json!([{"role": "user", "content": [
            image_part(&data_uri(&png(&case.image))),
            text_part("What do you see?"),
        ]}]);
        let (status, body) = gw.chat(messages).await;
        assert_eq!(status, 200, "{body}");
        let received = gw.received();
        let request = &received[n];
        assert_eq!(request.prompt_tokens, gateway_prompt(case), "{}", case.image);
        assert_eq!(body["usage"]["prompt_tokens"], request.prompt_tokens.len(), "usage counts image tokens");
        assert_eq!(body["usage"]["completion_tokens"], 2);

        assert_eq!(request.images.len(), 1);
        let tiles = &request.images[0];
        let [count, channels, side, _] = case.tile_shape;
        let grid = (tiles.rows * tiles.cols) as usize;
        assert_eq!(if grid > 1 { grid + 1 } else { grid }, count, "{}: tiles", case.image);
        assert_eq!((channels, tiles.tile_size as usize), (3, side));
        assert_eq!(tiles.pixels.len(), case.pixel_values.len());
        let expected = golden_u8(&case.pixel_values);
        let off = tiles.pixels.iter().zip(&expected).filter(|(a, b)| a != b).count();
        let far = tiles.pixels.iter().zip(&expected).filter(|(a, b)| a.abs_diff(**b) > 1).count();
        let name = &case.image;
        assert!(off * 1000 <= expected.len() && far == 0, "{name}: {off} values differ, {far} by more than one");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_sends_the_same_request_and_counts_image_tokens() {
    let gw = Harness::start(fixtures::TINY_LLAMA4, images(None)).await;
    let case = &vision_cases()[0];
    let messages = json!([{"role": "user", "content": [
        image_part(&data_uri(&png(&case.image))),
        text_part("What do you see?"),
    ]}]);
    let body = json!({"model": "tiny", "messages": messages, "max_tokens": 2, "stream": true,
                      "stream_options": {"include_usage": true}});
    let response = gw.http.post(format!("{}/v1/chat/completions", gw.base)).json(&body).send().await.expect("sse");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("stream");
    let usage = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|chunk| chunk.get("usage").filter(|u| !u.is_null()).cloned())
        .expect("a usage chunk");
    let request = &gw.received()[0];
    assert_eq!(request.prompt_tokens, gateway_prompt(case));
    assert_eq!(usage["prompt_tokens"], request.prompt_tokens.len());
    assert_eq!(request.images.len(), 1);
}

/// The images of a request, by prompt position: each `<|image_start|>...<|image_end|>` run.
fn expansions(prompt: &[u32]) -> Vec<Vec<u32>> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, &t) in prompt.iter().enumerate() {
        match t {
            493 => start = Some(i),
            494 => runs.push(prompt[start.take().expect("an opened image")..=i].to_vec()),
            _ => {}
        }
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_images_keep_their_order_within_and_across_messages() {
    let gw = Harness::start(fixtures::TINY_LLAMA4, images(None)).await;
    let cases = vision_cases();
    let (wide, small) = (&cases[0], &cases[1]);
    assert_eq!((wide.image.as_str(), small.image.as_str()), ("wide.png", "small.png"));
    let (wide_uri, small_uri) = (data_uri(&png("wide.png")), data_uri(&png("small.png")));

    // Each image alone first: the tiles each one gives.
    let mut alone = Vec::new();
    for uri in [&wide_uri, &small_uri] {
        let (status, body) = gw.chat(json!([{"role": "user", "content": [image_part(uri)]}])).await;
        assert_eq!(status, 200, "{body}");
        alone.push(gw.received().last().expect("request").images[0].clone());
    }

    let messages = json!([
        {"role": "user", "content": [
            text_part("First "), image_part(&small_uri), text_part(" then "), image_part(&wide_uri), text_part("?"),
        ]},
        {"role": "assistant", "content": "Two pictures."},
        {"role": "user", "content": [image_part(&wide_uri), text_part("And this one.")]},
    ]);
    let (status, body) = gw.chat(messages).await;
    assert_eq!(status, 200, "{body}");
    let request = gw.received().last().expect("request").clone();
    let order = [&alone[1], &alone[0], &alone[0]];
    assert_eq!(request.images.len(), 3);
    for (got, want) in request.images.iter().zip(order) {
        assert_eq!(got, want, "images in prompt order");
    }
    let runs = expansions(&request.prompt_tokens);
    assert_eq!(runs, [golden_expansion(small), golden_expansion(wide), golden_expansion(wide)]);
    // Between the images, the text as the template renders it.
    let mut collapsed = Vec::new();
    let mut inside = false;
    for &t in &request.prompt_tokens {
        match t {
            493 => {
                inside = true;
                collapsed.push(IMAGE);
            }
            494 => inside = false,
            _ if !inside => collapsed.push(t),
            _ => {}
        }
    }
    let tokenizer = tokenizers::Tokenizer::from_file(fixtures::dir(fixtures::TINY_LLAMA4).join("tokenizer.json"))
        .expect("tokenizer");
    let text = "<|begin_of_text|><|header_start|>user<|header_end|>\n\nFirst <|image|> then <|image|>?<|eot|>\
                <|header_start|>assistant<|header_end|>\n\nTwo pictures.<|eot|>\
                <|header_start|>user<|header_end|>\n\n<|image|>And this one.<|eot|>\
                <|header_start|>assistant<|header_end|>\n\n";
    assert_eq!(collapsed, tokenizer.encode(text, false).expect("encode").get_ids());
    assert_eq!(body["usage"]["prompt_tokens"], request.prompt_tokens.len());
}

/// Typing the placeholder text cannot add or move an image: a typed `<|image|>` stays one token of
/// text, and a typed `<|patch|>` (which would take image features) is refused, naming its part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_image_markers_are_text_not_images() {
    let gw = Harness::start(fixtures::TINY_LLAMA4, images(None)).await;
    let small = &vision_cases()[1];
    let uri = data_uri(&png("small.png"));
    let messages = json!([{"role": "user", "content": [text_part("<|image|> is typed; "), image_part(&uri)]}]);
    let (status, body) = gw.chat(messages).await;
    assert_eq!(status, 200, "{body}");
    let request = gw.received().last().expect("request").clone();
    assert_eq!(request.images.len(), 1);
    assert_eq!(expansions(&request.prompt_tokens), [golden_expansion(small)]);
    let start = request.prompt_tokens.iter().position(|&t| t == 493).expect("image");
    assert!(request.prompt_tokens[..start].contains(&IMAGE), "the typed marker stays a plain token");

    let message = gw
        .refused(
            json!([
                {"role": "user", "content": [image_part(&uri)]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [text_part("and"), text_part("x <|patch|> y")]},
            ]),
            "messages[2].content[1]",
        )
        .await;
    assert!(message.contains("<|patch|>"), "{message}");
    assert!(gw.received().iter().all(|r| r.prompt_tokens.iter().filter(|&&t| t == PATCH).count() % 4 == 0));
}

/// A PNG whose header claims `width × height` (valid chunks and checksums, a few bytes of image
/// data): a decompression bomb's header.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend((data.len() as u32).to_be_bytes());
        let typed: Vec<u8> = kind.iter().chain(data).copied().collect();
        png.extend(&typed);
        png.extend(crc32(&typed).to_be_bytes());
    };
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    png
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_image_is_a_400_naming_its_part() {
    let wide = png("wide.png");
    let gw = Harness::start(fixtures::TINY_LLAMA4, images(None)).await;
    let user = |part: Value| json!([{"role": "user", "content": [text_part("look"), part]}]);
    let at = "messages[0].content[1]";

    let m = gw.refused(user(image_part("data:image/png;base64,iVBO@@@@")), at).await;
    assert!(m.contains("base64"), "{m}");
    let m = gw.refused(user(image_part("data:image/png,rawbytes")), at).await;
    assert!(m.contains("base64"), "{m}");
    let mut truncated = wide.clone();
    truncated.truncate(wide.len() / 2);
    gw.refused(user(image_part(&data_uri(&truncated))), at).await;
    gw.refused(user(image_part(&data_uri(b"these bytes are no image at all"))), at).await;
    // A 1×1 BMP: a real image, in a format the server does not take.
    let mut bmp = b"BM".to_vec();
    bmp.extend(58u32.to_le_bytes());
    bmp.extend([0, 0, 0, 0, 54, 0, 0, 0, 40, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 24, 0]);
    bmp.extend([0; 24]);
    bmp.extend([255, 0, 0, 0]);
    let m = gw.refused(user(image_part(&data_uri(&bmp))), at).await;
    assert!(m.to_lowercase().contains("format") || m.to_lowercase().contains("unsupported"), "{m}");
    let m = gw.refused(user(image_part(&data_uri(&png_header(100_000, 100_000)))), at).await;
    assert!(m.contains("pixels"), "{m}");
    let m = gw.refused(user(image_part("https://example.com/cat.png")), at).await;
    assert!(m.contains("--image-fetch"), "{m}");
    gw.refused(user(image_part("file:///etc/passwd")), at).await;
    let m = gw
        .refused(
            json!([{"role": "system", "content": [image_part(&data_uri(&wide))]}, {"role": "user", "content": "hi"}]),
            "messages[0].content[0]",
        )
        .await;
    assert!(m.contains("user messages"), "{m}");
    assert!(gw.received().is_empty(), "nothing reached the coordinator");

    // Limits.
    let small_limits = ImageConfig {
        max_images_per_request: 2,
        max_image_bytes: wide.len() - 1,
        max_image_pixels: 120 * 50 - 1,
        fetch: None,
    };
    let strict = Harness::start(fixtures::TINY_LLAMA4, small_limits).await;
    let small = data_uri(&png("small.png"));
    let m = strict
        .refused(
            json!([
                {"role": "user", "content": [image_part(&small), image_part(&small)]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [text_part("one more"), image_part(&small)]},
            ]),
            "messages[2].content[1]",
        )
        .await;
    assert!(m.contains("At most 2 images"), "{m}");
    let m = strict.refused(user(image_part(&data_uri(&wide))), at).await;
    assert!(m.contains("bytes"), "{m}");
    // small.png (30×40, 195 bytes) is under both limits.
    let (status, body) = strict.chat(user(image_part(&small))).await;
    assert_eq!(status, 200, "{body}");
    let pixels_only = ImageConfig { max_image_pixels: 120 * 50 - 1, ..ImageConfig::default() };
    let pixel_limited = Harness::start(fixtures::TINY_LLAMA4, pixels_only).await;
    let m = pixel_limited.refused(user(image_part(&data_uri(&wide))), at).await;
    assert!(m.contains("pixels"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_a_vision_tower_refuses_images() {
    let gw = Harness::start(fixtures::TINY_LLAMA4_TOP2, images(None)).await;
    let uri = data_uri(&png("small.png"));
    let m = gw
        .refused(
            json!([{"role": "user", "content": [text_part("a"), text_part("b"), image_part(&uri)]}]),
            "messages[0].content[2]",
        )
        .await;
    assert_eq!(m, "This model does not accept images.");
    let (status, body) = gw.chat(json!([{"role": "user", "content": "text still works"}])).await;
    assert_eq!(status, 200, "{body}");
}
