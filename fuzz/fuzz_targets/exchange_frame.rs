//! An exchange frame as a worker receives it: protobuf bytes of `ExchangeRequest`, validated into an
//! `Exchange` and its payload decoded into rows; and the same bytes read as the `ExchangeResponse`
//! a coordinator receives, checked and decoded as `coordinator/src/transport/grpc.rs` does.
#![no_main]

use epserve_proto::exchange::Exchange;
use epserve_proto::v1::{ExchangeRequest, ExchangeResponse};
use epserve_proto::wire::WireDtype;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Rows are decoded only up to this many values: an accepted frame's payload is at most the input's
/// length anyway, this keeps a frame of many empty-width rows from costing more than its bytes.
const MAX_VALUES: usize = 1 << 20;

fuzz_target!(|frame: &[u8]| {
    if let Ok(request) = ExchangeRequest::decode(frame) {
        worker_side(request);
    }
    if let Ok(answer) = ExchangeResponse::decode(frame) {
        coordinator_side(answer);
    }
});

fn worker_side(request: ExchangeRequest) {
    let Ok(x) = Exchange::try_from(request) else { return };
    let rows = x.total_rows();
    // What validation promises the worker: the payload is exactly the announced rows.
    assert_eq!(x.payload.len(), x.dtype.payload_bytes(rows, x.hidden));
    if rows.saturating_mul(x.hidden) <= MAX_VALUES {
        let mut values = Vec::new();
        x.dtype.decode_into(&x.payload, x.hidden, &mut values);
        assert_eq!(values.len(), rows * x.hidden);
        // What the worker sends back for these rows is accepted by validation again.
        let answer = x.dtype.encode(&values, x.hidden);
        assert_eq!(answer.len(), x.payload.len());
    }
    let again = Exchange::try_from(x.clone().into_proto());
    assert!(again.is_ok(), "a validated exchange re-encodes to an invalid one: {again:?}");
}

fn coordinator_side(answer: ExchangeResponse) {
    // The coordinator knows the rows and width it sent; here they are read from the frame itself.
    let rows = (answer.id % 64) as usize;
    let hidden = (answer.compute_micros % 4096) as usize + 1;
    let wire = WireDtype::from_proto(answer.dtype).unwrap_or(WireDtype::Bf16);
    if answer.payload.len() != wire.payload_bytes(rows, hidden) {
        return;
    }
    let mut decoded = Vec::new();
    wire.decode_into(&answer.payload, hidden, &mut decoded);
    assert_eq!(decoded.len(), rows * hidden);
}
