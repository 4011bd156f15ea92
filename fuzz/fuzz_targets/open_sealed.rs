//! `Sealer::open` with a fixed key on arbitrary places and bytes never panics, and whatever
//! opens is what was sealed: seal -> open round-trips at the same place and fails elsewhere.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pii_vault::vault::seal::{OVERHEAD, Place, SealFormat, Sealer};
use pii_vault::vault::{KeyId, SecretKey};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    place: [&'a str; 4],
    other: [&'a str; 4],
    sealed: &'a [u8],
    plaintext: &'a [u8],
}

fn place<'a>(parts: &[&'a str; 4]) -> Place<'a> {
    Place {
        table: parts[0],
        field: parts[1],
        message_id: parts[2],
        user_id: parts[3],
    }
}

fuzz_target!(|input: Input<'_>| {
    let sealer = Sealer::new(
        KeyId(7),
        &SecretKey::take_from(&mut [0x42; 32]).unwrap(),
        SealFormat::CURRENT,
    );
    let here = place(&input.place);
    let there = place(&input.other);

    // Arbitrary bytes: never a panic, and (without the key) never an opening.
    if let Ok(opened) = sealer.open(&here, input.sealed) {
        panic!("forged a sealed value of {} bytes", opened.len());
    }

    let sealed = sealer.seal(&here, input.plaintext);
    assert_eq!(sealed.len(), input.plaintext.len() + OVERHEAD);
    assert_eq!(
        sealer.open(&here, &sealed).unwrap().as_slice(),
        input.plaintext
    );
    assert_eq!(sealer.open(&there, &sealed).is_ok(), here == there);
    let other_key = Sealer::new(
        KeyId(8),
        &SecretKey::take_from(&mut [0x42; 32]).unwrap(),
        SealFormat::CURRENT,
    );
    assert!(
        other_key.open(&here, &sealed).is_err(),
        "the key id is bound"
    );
});
