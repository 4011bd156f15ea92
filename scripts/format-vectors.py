#!/usr/bin/env python3
"""Golden vectors for pii-vault's storage format, from an implementation of docs/FORMAT.md that
shares no code with the Rust side.

    python3 scripts/format-vectors.py            # (re)write tests/data/vectors/*.json
    python3 scripts/format-vectors.py --check    # re-derive and compare with the committed files,
                                                 # and open / verify the fixtures the Rust code wrote

Everything here follows the spec text, not the Rust source: AES-256-GCM-SIV and HKDF from
`cryptography` (>= 42 for AESGCMSIV; pinned in scripts/requirements-vectors.txt), HMAC and
SHA-256 from the standard library, the ip text form and the whitespace set written out below.
Output is deterministic: fixed keys, fixed nonces, fixed values, RFC 6979 signatures.

`make vectors-check` runs --check in its own venv (.venv-vectors).
"""

import argparse
import datetime
import hashlib
import hmac
import ipaddress
import json
import struct
import sys
from pathlib import Path

try:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError as error:  # pragma: no cover - a setup problem, said plainly
    sys.exit(
        f"format-vectors: {error}. Install the pinned dependency first:\n"
        "  python3 -m venv .venv-vectors && .venv-vectors/bin/pip install -r scripts/requirements-vectors.txt\n"
        "  .venv-vectors/bin/python scripts/format-vectors.py --check"
    )

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "vectors"
SPEC = "docs/FORMAT.md"
GENERATOR = "scripts/format-vectors.py"

# ----------------------------------------------------------------------------- fixed inputs

TOKEN_KEY = bytes(range(0x00, 0x20))  # 000102...1f
DATA_KEY = bytes(range(0x80, 0xA0))  # 808182...9f
TOKEN_KEY_ID = 1
DATA_KEY_ID = 2
# ECDSA P-256 private scalar of the vectors' checkpoint signer.
CHECKPOINT_SCALAR = bytes([0x07] * 32)


def nonce(n):
    """The n-th fixed nonce: 12 bytes, n in the last byte, 0xa0.. before it."""
    return bytes(range(0xA0, 0xAB)) + bytes([n])


# ------------------------------------------------------------------------- the format itself

# FORMAT.md "Canonical device id": Rust's str::trim removes the Unicode White_Space characters
# from both ends. Written out, because Python's str.strip() uses another set (it also strips
# U+001C..U+001F, which are not White_Space).
WHITE_SPACE = frozenset(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680]
    + list(range(0x2000, 0x200B))
    + [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)


def canonical_device_id(text):
    start, end = 0, len(text)
    while start < end and ord(text[start]) in WHITE_SPACE:
        start += 1
    while end > start and ord(text[end - 1]) in WHITE_SPACE:
        end -= 1
    return text[start:end]


def ipv6_text(packed):
    """RFC 5952: lowercase hex without leading zeros; the longest run of two or more zero
    groups (the leftmost of equal runs) becomes '::'."""
    groups = [int.from_bytes(packed[i : i + 2], "big") for i in range(0, 16, 2)]
    best_start, best_len, i = -1, 0, 0
    while i < 8:
        if groups[i] != 0:
            i += 1
            continue
        j = i
        while j < 8 and groups[j] == 0:
            j += 1
        if j - i > best_len:
            best_start, best_len = i, j - i
        i = j
    text = [format(g, "x") for g in groups]
    if best_len < 2:
        return ":".join(text)
    return ":".join(text[:best_start]) + "::" + ":".join(text[best_start + best_len :])


def canonical_ip(text):
    """FORMAT.md "Canonical ip": parsed; an IPv4-mapped IPv6 address (::ffff:0:0/96) becomes
    its IPv4 address; IPv4 prints as dotted decimal, IPv6 as RFC 5952 text."""
    packed = ipaddress.ip_address(text).packed
    if len(packed) == 16 and packed[:12] == bytes(10) + b"\xff\xff":
        packed = packed[12:]
    if len(packed) == 4:
        return ".".join(str(b) for b in packed)
    return ipv6_text(packed)


HKDF_INFO = {"ip": b"pii-vault/token/v1/ip", "device_id": b"pii-vault/token/v1/device_id"}


def field_key(token_key, field):
    """HKDF-SHA256, no salt (so HashLen zero bytes), ikm = the token key, 32 bytes."""
    okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO[field]).derive(
        token_key
    )
    # The same by hand (RFC 5869 with L = HashLen: OKM = T(1)), as a guard on the library call.
    prk = hmac.new(bytes(32), token_key, hashlib.sha256).digest()
    assert okm == hmac.new(prk, HKDF_INFO[field] + b"\x01", hashlib.sha256).digest()
    return okm


def hkdf_prk(token_key):
    return hmac.new(bytes(32), token_key, hashlib.sha256).digest()


def token(token_key, field, value):
    canonical = canonical_ip(value) if field == "ip" else canonical_device_id(value)
    return hmac.new(field_key(token_key, field), canonical.encode("utf-8"), hashlib.sha256).hexdigest()


def part(data):
    """One length-prefixed part: u32 big-endian length, then the bytes."""
    return struct.pack(">I", len(data)) + data


def i64(value):
    return struct.pack(">q", value)


def i32(value):
    return struct.pack(">i", value)


AD_VERSION = b"pii-vault/seal/v1"


def associated_data(table, field, message_id, user_id, key_id):
    return b"".join(
        part(p)
        for p in (
            AD_VERSION,
            table.encode("utf-8"),
            field.encode("utf-8"),
            message_id.encode("utf-8"),
            user_id.encode("utf-8"),
            i64(key_id),
        )
    )


def seal(data_key, nonce_bytes, ad, plaintext):
    """nonce (12) || ciphertext || tag (16), AES-256-GCM-SIV."""
    assert len(data_key) == 32 and len(nonce_bytes) == 12
    return nonce_bytes + AESGCMSIV(data_key).encrypt(nonce_bytes, plaintext, ad)


def open_sealed(data_key, ad, sealed):
    if len(sealed) < 28:
        raise ValueError("shorter than nonce and tag")
    return AESGCMSIV(data_key).decrypt(sealed[:12], sealed[12:], ad)


# Format 2 (FORMAT.md §4, "Format 2"): the data key is not used as is; HKDF-SHA256 derives from
# it the key that seals and the key commitment every value carries.
AD_VERSION_V2 = b"pii-vault/seal/v2"
SEAL_KEY_INFO_V2 = b"pii-vault/seal/v2/key"
COMMITMENT_INFO_V2 = b"pii-vault/seal/v2/commitment"


def seal_v2_keys(data_key):
    """(PRK, seal key, commitment): HKDF-Extract without salt, then one Expand per label."""
    prk = hmac.new(bytes(32), data_key, hashlib.sha256).digest()
    seal_key = hmac.new(prk, SEAL_KEY_INFO_V2 + b"\x01", hashlib.sha256).digest()
    commitment = hmac.new(prk, COMMITMENT_INFO_V2 + b"\x01", hashlib.sha256).digest()
    # The same through the library, as a guard on the hand-written HKDF.
    for info, expected in ((SEAL_KEY_INFO_V2, seal_key), (COMMITMENT_INFO_V2, commitment)):
        assert HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(data_key) == expected
    return prk, seal_key, commitment


def associated_data_v2(table, field, message_id, user_id, key_id):
    return part(AD_VERSION_V2) + associated_data(table, field, message_id, user_id, key_id)[len(part(AD_VERSION)):]


def seal_v2(data_key, nonce_bytes, ad, plaintext):
    """commitment (32) || nonce (12) || ciphertext || tag (16), under the derived seal key."""
    _, seal_key, commitment = seal_v2_keys(data_key)
    return commitment + seal(seal_key, nonce_bytes, ad, plaintext)


def open_sealed_v2(data_key, ad, sealed):
    _, seal_key, commitment = seal_v2_keys(data_key)
    if len(sealed) < 60:
        raise ValueError("shorter than commitment, nonce and tag")
    if not hmac.compare_digest(sealed[:32], commitment):
        raise ValueError("the key commitment is not this key's")
    return open_sealed(seal_key, ad, sealed[32:])


LOGINS_TABLE, QUARANTINE_TABLE = "user_logins", "quarantine"


def app_version_encoded(text):
    """FORMAT.md "app_version": up to three '.'-separated parts of 1 to 4 ASCII digits,
    major * 1_000_000 + minor * 1_000 + patch (missing parts are 0), minor and patch at most
    999, refused exactly when the value exceeds 2147483647 (PostgreSQL's integer, i32), so
    2147.483.647 is the largest. Leading zeros and zero trailing parts encode alike (1.2, 1.02
    and 1.2.0 are all 1002000). None if refused."""
    parts = text.split(".")
    if not text or len(parts) > 3:
        return None
    if any(not (1 <= len(p) <= 4) or any(c not in "0123456789" for c in p) for p in parts):
        return None
    major, minor, patch = ([int(p) for p in parts] + [0, 0])[:3]
    if minor > 999 or patch > 999:
        return None
    encoded = major * 1_000_000 + minor * 1_000 + patch
    return encoded if encoded <= 2_147_483_647 else None


APP_VERSIONS = ["2.3.0", "0.96", "3.7", "6.02", "6.2", "6.20", "2", "2.00", "0.0.1", "2146.999.999",
                "2147", "1.1000", "1.2.3.4", " 1.2", "v1.2", "12345", "1.", "", "\u0661.2",
                "2147.483.647", "2147.483.648", "2147.484", "1.2", "1.02", "01.2.0", "9999"]


def audit_hash(row):
    if row["format"] == 1:
        parts = [
            b"pii-vault/audit/v1",
            bytes.fromhex(row["prev_hash"]),
            i64(row["at_micros"]),
            row["actor"].encode("utf-8"),
            row["db_user"].encode("utf-8"),
            row["reason"].encode("utf-8"),
            row["question"].encode("utf-8"),
            i32(row["values_revealed"]),
            row["outcome"].encode("utf-8"),
        ]
    else:
        parts = [
            b"pii-vault/audit/v2",
            bytes.fromhex(row["prev_hash"]),
            i64(row["at_micros"]),
            row["actor"].encode("utf-8"),
            row["db_user"].encode("utf-8"),
            row["purpose"].encode("utf-8"),
            row["reason"].encode("utf-8"),
            row["question"].encode("utf-8"),
            i32(row["values_revealed"]),
            row["outcome"].encode("utf-8"),
            b"".join(i64(i) for i in row["login_ids"]),
            b"".join(i64(i) for i in row["key_ids"]),
        ]
    preimage = b"".join(part(p) for p in parts)
    return preimage, hashlib.sha256(preimage).digest()


def checkpoint_message(last_id, head_hash, signed_at_micros):
    return b"".join(
        part(p)
        for p in (b"pii-vault/audit-checkpoint/v1", i64(last_id), head_hash, i64(signed_at_micros))
    )


def checkpoint_message_v2(seq, last_id, head_hash, signed_at_micros):
    return b"".join(
        part(p)
        for p in (b"pii-vault/audit-checkpoint/v2", i64(seq), i64(last_id), head_hash,
                  i64(signed_at_micros))
    )


def witness_object(seq, last_id, head_hash, signed_at_micros, kms_key_id, signature):
    """The witness bucket's object for a format-2 checkpoint: JSON, two-space indent, fields
    in this order, binary fields in lowercase hex, a final newline."""
    return json.dumps({
        "format": "pii-vault/audit-checkpoint/v2",
        "seq": seq,
        "last_audit_id": last_id,
        "head_hash": head_hash.hex(),
        "signed_at_micros": signed_at_micros,
        "kms_key_id": kms_key_id,
        "signature_der": signature.hex(),
    }, indent=2) + "\n"


def checkpoint_key():
    return ec.derive_private_key(int.from_bytes(CHECKPOINT_SCALAR, "big"), ec.SECP256R1())


def spki_der(public_key):
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def rfc3339(micros):
    seconds, fraction = divmod(micros, 1_000_000)
    at = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return at.replace(microsecond=fraction).isoformat().replace("+00:00", "Z")


def utf8_hex(text):
    return text.encode("utf-8").hex()


def header(what, section):
    return {
        "about": what,
        "spec": f"{SPEC}, {section}",
        "generated_by": f"{GENERATOR} (independent of the Rust code; --check re-derives this file)",
    }


# ------------------------------------------------------------------------------ the vectors


def kms_vectors():
    contexts = []
    for purpose, key_id in [("token", 1), ("data", 2), ("data", 4294967298), ("token", 9007199254740993)]:
        contexts.append(
            {"purpose": purpose, "key_id": key_id, "encryption_context": {"purpose": purpose, "key_id": str(key_id)}}
        )
    return {
        **header("KMS encryption context of a wrapped key in vault_keys", "§2 Keys"),
        "contexts": contexts,
    }


IP_CASES = [
    "203.0.113.7",
    "::ffff:203.0.113.7",
    "::FFFF:CB00:7107",
    "0:0:0:0:0:ffff:203.0.113.7",
    "2001:DB8:0000:0000:0000:0000:0000:0001",
    "2001:db8::1",
    "2001:db8:0:0:1:0:0:1",
    "2001:db8:0:1:0:0:0:1",
    "2001:db8:0:1:1:1:1:1",
    "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
    "1:2:3:4:5:6:7::",
    "::2:3:4:5:6:7:8",
    "::1.2.3.4",
    "64:ff9b::192.0.2.33",
    "::ffff:0:1.2.3.4",
    "::",
    "::1",
    "::ffff:0.0.0.0",
    "fe80::1",
    "255.255.255.255",
]

# Texts the ip parser refuses (the message is quarantined): no trimming, no zone, no brackets,
# no leading zeros, exactly four IPv4 parts. Stated, not derived: Python's ipaddress accepts a
# zone ("fe80::1%eth0") that the Rust parser refuses.
IP_REJECTED = ["1.2.3.4 ", " 1.2.3.4", "01.2.3.4", "1.2.3", "1.2.3.4.5", "fe80::1%eth0", "[::1]", "::ffff:1.2.3.4:5", ""]

DEVICE_ID_CASES = [
    "593-47-5928",
    " 593-47-5928\t",
    "\u3000\u00a0 Ger\u00e4t 42\u2003\u202f",
    "\u0085dev\u2028\u2029",
    "\u1680\u205f\u2000\u200adev\u000b\u000c\r\n",
    "\u200bdev-42\ufeff",
    "\u180edev-42",
    "\u001cdev\u001f",
    "1.2.3.4",
    "Z\u00fcrich \U0001f600",
]


def token_vectors():
    fields = []
    for field in ("ip", "device_id"):
        fields.append(
            {
                "field": field,
                "info": HKDF_INFO[field].decode(),
                "info_hex": HKDF_INFO[field].hex(),
                "field_key": field_key(TOKEN_KEY, field).hex(),
            }
        )
    cases = []
    for field, inputs in (("ip", IP_CASES), ("device_id", DEVICE_ID_CASES)):
        for value in inputs:
            canonical = canonical_ip(value) if field == "ip" else canonical_device_id(value)
            cases.append(
                {
                    "field": field,
                    "input": value,
                    "input_utf8_hex": utf8_hex(value),
                    "canonical": canonical,
                    "canonical_utf8_hex": utf8_hex(canonical),
                    "token": token(TOKEN_KEY, field, value),
                }
            )
    return {
        **header("tokens: per-field keys by HKDF-SHA256, canonical forms, HMAC-SHA256", "§3 Tokens"),
        "token_key_id": TOKEN_KEY_ID,
        "token_key": TOKEN_KEY.hex(),
        "hkdf": {
            "hash": "SHA-256",
            "salt": "",
            "salt_meaning": "none given: HKDF uses HashLen (32) zero bytes, the same as an empty salt",
            "ikm": "the 32-byte token key",
            "length": 32,
            "prk": hkdf_prk(TOKEN_KEY).hex(),
            "fields": fields,
        },
        "cases": cases,
        "ip_rejected": IP_REJECTED,
    }


SEAL_CASES = [
    # (table, field, message_id, user_id, key_id, plaintext)
    (LOGINS_TABLE, "ip", "3b7f0c8e-6d2a-4c55-9f31-0e8d2a7b9c10", "u-1001", DATA_KEY_ID, b"203.0.113.7"),
    (
        LOGINS_TABLE,
        "device_id",
        "3b7f0c8e-6d2a-4c55-9f31-0e8d2a7b9c10",
        "Zo\u00eb-\u03a9-\U0001f600",
        4294967298,
        "\u3000 593-47-5928\u00a0".encode("utf-8"),
    ),
    (LOGINS_TABLE, "ip", "logins.jsonl:7", "u-7", 0x0102030405060708, b"2001:DB8::1"),
    (QUARANTINE_TABLE, "body", "logins.jsonl:13", "", DATA_KEY_ID, b'{"ip": "\xff\xfe", "foo": 1}'),
    (QUARANTINE_TABLE, "body", "m-empty", "", DATA_KEY_ID, b""),
]


def seal_vectors():
    cases = []
    for n, (table, field, message_id, user_id, key_id, plaintext) in enumerate(SEAL_CASES):
        ad = associated_data(table, field, message_id, user_id, key_id)
        sealed = seal(DATA_KEY, nonce(n), ad, plaintext)
        case = {
            "place": {"table": table, "field": field, "message_id": message_id, "user_id": user_id},
            "key_id": key_id,
            "nonce": nonce(n).hex(),
            "plaintext_hex": plaintext.hex(),
        }
        try:
            case["plaintext"] = plaintext.decode("utf-8")
        except UnicodeDecodeError:
            case["plaintext"] = None
        case["associated_data"] = ad.hex()
        case["sealed"] = sealed.hex()
        cases.append(case)
    return {
        **header("sealed values: associated data and nonce || ciphertext || tag", "§4 Sealed values"),
        "data_key": DATA_KEY.hex(),
        "cases": cases,
    }


def seal_v2_vectors():
    prk, seal_key, commitment = seal_v2_keys(DATA_KEY)
    cases = []
    for n, (table, field, message_id, user_id, key_id, plaintext) in enumerate(SEAL_CASES):
        ad = associated_data_v2(table, field, message_id, user_id, key_id)
        sealed = seal_v2(DATA_KEY, nonce(n), ad, plaintext)
        assert open_sealed_v2(DATA_KEY, ad, sealed) == plaintext
        cases.append({
            "place": {"table": table, "field": field, "message_id": message_id, "user_id": user_id},
            "key_id": key_id,
            "nonce": nonce(n).hex(),
            "plaintext_hex": plaintext.hex(),
            "associated_data": ad.hex(),
            "sealed": sealed.hex(),
        })
    # Another key commits to another value: a value of one key is refused by every other.
    other_key = bytes(range(0x81, 0xA1))
    return {
        **header("sealed values, format 2: key commitment || nonce || ciphertext || tag", "§4 Sealed values"),
        "data_key": DATA_KEY.hex(),
        "prk": prk.hex(),
        "seal_key": seal_key.hex(),
        "commitment": commitment.hex(),
        "other_key": other_key.hex(),
        "other_key_commitment": seal_v2_keys(other_key)[2].hex(),
        "cases": cases,
    }


# Message bodies as a queue delivers them, with what ingest makes of each (validation is not
# re-implemented here: the outcome is stated). JSON escapes are decoded before anything is
# sealed or tokenized: the sealed plaintext is the decoded string, not its JSON source text.
MESSAGES = [
    (
        "5d1f9a0e-1111-4c55-9f31-0e8d2a7b9c10",
        b'{"user_id": "\\u00fcser-42 \\ud83d\\ude00", "app_version": "2.3.0", "device_type": "android", '
        b'"ip": "2001:DB8:0:0:0:0:0:1", "locale": "de", "device_id": "\\u3000 593-47-5928 \\u00a0"}',
        "login",
    ),
    (
        "5d1f9a0e-2222-4c55-9f31-0e8d2a7b9c10",
        '{"user_id":"u-7","app_version":"0.96","device_type":"ios","ip":"::ffff:10.1.2.3","locale":null,'
        '"device_id":"dev\\u002d7 \u00e9"}'.encode("utf-8"),
        "login",
    ),
    (
        "5d1f9a0e-3333-4c55-9f31-0e8d2a7b9c10",
        b'{"user_id": "u-9", "app_version": "3.7", "device_type": "web", "ip": "198.51.100.23", '
        b'"locale": "RU", "device_id": "\\t593-47-5928"}',
        "quarantine",  # the decoded device id holds a control character (U+0009)
    ),
    ("5d1f9a0e-4444-4c55-9f31-0e8d2a7b9c10", b'{"foo": "oops_wrong_msg_type", "bar": "123"}', "quarantine"),
    ("5d1f9a0e-5555-4c55-9f31-0e8d2a7b9c10", b'{"user_id": "u-\xff", "ip": "10.0.0.1"}', "quarantine"),
]


def ingest_vectors():
    messages = []
    n = 16
    for message_id, body, outcome in MESSAGES:
        entry = {"message_id": message_id, "body_hex": body.hex()}
        try:
            entry["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            entry["body"] = None
        fields = json.loads(body) if outcome == "login" else None
        if fields is None:
            ad = associated_data(QUARANTINE_TABLE, "body", message_id, "", DATA_KEY_ID)
            entry["outcome"] = "quarantine"
            entry["body_place"] = {"table": QUARANTINE_TABLE, "field": "body", "message_id": message_id, "user_id": ""}
            entry["body_associated_data"] = ad.hex()
            entry["sealed_body"] = seal(DATA_KEY, nonce(n), ad, body).hex()
            n += 1
        else:
            entry["outcome"] = "login"
            entry["user_id"] = fields["user_id"]
            entry["user_id_utf8_hex"] = utf8_hex(fields["user_id"])
            entry["app_version"] = {"text": fields["app_version"], "encoded": app_version_encoded(fields["app_version"])}
            for field in ("ip", "device_id"):
                raw = fields[field]
                canonical = canonical_ip(raw) if field == "ip" else canonical_device_id(raw)
                ad = associated_data(LOGINS_TABLE, field, message_id, fields["user_id"], DATA_KEY_ID)
                entry[field] = {
                    "plaintext": raw,
                    "plaintext_utf8_hex": utf8_hex(raw),
                    "canonical": canonical,
                    "token": token(TOKEN_KEY, field, raw),
                    "place": {
                        "table": LOGINS_TABLE,
                        "field": field,
                        "message_id": message_id,
                        "user_id": fields["user_id"],
                    },
                    "associated_data": ad.hex(),
                    "sealed": seal(DATA_KEY, nonce(n), ad, raw.encode("utf-8")).hex(),
                }
                n += 1
        messages.append(entry)
    return {
        **header(
            "a batch end to end: what is sealed (the decoded JSON string, or the raw body) and what is tokenized",
            "§5 What ingest stores",
        ),
        "token_key_id": TOKEN_KEY_ID,
        "token_key": TOKEN_KEY.hex(),
        "data_key_id": DATA_KEY_ID,
        "data_key": DATA_KEY.hex(),
        "messages": messages,
        "app_versions": [{"text": t, "encoded": app_version_encoded(t)} for t in APP_VERSIONS],
        "app_versions_note": "encoded null: refused, the message is quarantined",
    }


GENESIS = bytes(32)

AUDIT_ROWS = [
    # format 1 rows, as pii-vault before 0.2 wrote them
    dict(format=1, at_micros=1_735_689_600_000_001, actor="alice", db_user="compliance_alice",
         purpose=None, reason="ticket 17", question="user_id = u-1", values_revealed=2,
         outcome="revealed", login_ids=None, key_ids=None),
    dict(format=1, at_micros=1_735_689_660_999_999, actor="alice", db_user="compliance_alice",
         purpose=None, reason="ticket 18", question="masked_ip = 3f0c", values_revealed=0,
         outcome="nothing-found", login_ids=None, key_ids=None),
    # format 2 rows, as audit_append (migration 0005) writes them
    dict(format=2, at_micros=1_767_225_600_123_456, actor="Zo\u00eb \u00c5ngstr\u00f6m",
         db_user="compliance_zoe", purpose="fraud-investigation", reason="case 4711",
         question="user_id = \u00fcser-42 \U0001f600", values_revealed=0, outcome="handed-out",
         login_ids=[1, 2, 4294967298], key_ids=[1, 2]),
    dict(format=2, at_micros=1_767_225_600_234_567, actor="Zo\u00eb \u00c5ngstr\u00f6m",
         db_user="compliance_zoe", purpose="fraud-investigation", reason="case 4711",
         question="outcome of audit row 3", values_revealed=6, outcome="revealed",
         login_ids=[1, 2, 4294967298], key_ids=[1, 2]),
    dict(format=2, at_micros=1_767_225_700_000_000, actor="", db_user="analyst_bob", purpose="",
         reason="", question="user_id = u-1", values_revealed=0, outcome="refused-purpose",
         login_ids=[], key_ids=[]),
]


def audit_vectors():
    rows = []
    prev = GENESIS
    for number, spec in enumerate(AUDIT_ROWS, start=1):
        row = {"id": number, **spec, "at": rfc3339(spec["at_micros"]), "prev_hash": prev.hex()}
        preimage, digest = audit_hash(row)
        row["preimage"] = preimage.hex()
        row["hash"] = digest.hex()
        rows.append(row)
        prev = digest
    signed_at = 1_767_225_800_123_000  # checkpoints are signed at millisecond precision
    message = checkpoint_message(rows[-1]["id"], prev, signed_at)
    key = checkpoint_key()
    signature = key.sign(message, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    key.public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))
    # A witnessed checkpoint (format 2) of the same head, numbered 2^32 + 7 so that the
    # number's i64 shows in more than its last byte.
    seq, signed_at_2 = 4_294_967_303, signed_at + 60_000
    message_2 = checkpoint_message_v2(seq, rows[-1]["id"], prev, signed_at_2)
    signature_2 = key.sign(message_2, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    key.public_key().verify(signature_2, message_2, ec.ECDSA(hashes.SHA256()))
    kms_key_id = "arn:aws:kms:us-east-1:111122223333:key/0b9e8f3c-2d4a-4c1e-9f00-7a6b5c4d3e2f"
    return {
        **header("the audit chain (formats 1 and 2), a signed checkpoint and a witnessed one",
                 "§7 Audit"),
        "genesis": GENESIS.hex(),
        "rows": rows,
        "checkpoint": {
            "last_audit_id": rows[-1]["id"],
            "head_hash": prev.hex(),
            "signed_at_micros": signed_at,
            "signed_at": rfc3339(signed_at),
            "message": message.hex(),
            "private_key": CHECKPOINT_SCALAR.hex(),
            "public_key_spki_der": spki_der(key.public_key()).hex(),
            "signature_der": signature.hex(),
            "signature_note": "ECDSA P-256 over SHA-256 of the message, DER; deterministic (RFC 6979) here, random k in production (KMS)",
        },
        "witnessed_checkpoint": {
            "seq": seq,
            "last_audit_id": rows[-1]["id"],
            "head_hash": prev.hex(),
            "signed_at_micros": signed_at_2,
            "signed_at": rfc3339(signed_at_2),
            "kms_key_id": kms_key_id,
            "message": message_2.hex(),
            "signature_der": signature_2.hex(),
            "object_key": f"checkpoints/{seq:020d}.json",
            "object": witness_object(seq, rows[-1]["id"], prev, signed_at_2, kms_key_id,
                                     signature_2),
        },
    }


GENERATED = {
    "kms.json": kms_vectors,
    "tokens.json": token_vectors,
    "seal.json": seal_vectors,
    "seal-v2.json": seal_v2_vectors,
    "ingest.json": ingest_vectors,
    "audit.json": audit_vectors,
}

# Written once by the Rust code of the version in the name (ignored tests
# `write_fixture_*`); never regenerated, only checked.
FIXTURE_SEALED = "fixture-sealed-0.1.0.json"
FIXTURE_AUDIT = "fixture-audit-0.1.0.json"


def render(document):
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"


# ------------------------------------------------------------------ checking the Rust fixtures


def check_sealed_fixture(path):
    fixture = json.loads(path.read_text())
    token_key, data_key = bytes.fromhex(fixture["token_key"]), bytes.fromhex(fixture["data_key"])
    data_key_id = fixture["data_key_id"]
    checked = 0
    for login in fixture["logins"]:
        fields = json.loads(bytes.fromhex(login["body_hex"]))
        for field in ("ip", "device_id"):
            ad = associated_data(LOGINS_TABLE, field, login["message_id"], fields["user_id"], data_key_id)
            opened = open_sealed(data_key, ad, bytes.fromhex(login["sealed_" + field]))
            if opened != fields[field].encode("utf-8"):
                raise AssertionError(f"{path.name}: {login['message_id']} {field} opened to other text")
            if token(token_key, field, fields[field]) != login["masked_" + field]:
                raise AssertionError(f"{path.name}: {login['message_id']} {field} token differs")
            checked += 1
    for row in fixture["quarantined"]:
        ad = associated_data(QUARANTINE_TABLE, "body", row["message_id"], "", data_key_id)
        if open_sealed(data_key, ad, bytes.fromhex(row["sealed_body"])) != bytes.fromhex(row["body_hex"]):
            raise AssertionError(f"{path.name}: {row['message_id']} body opened to other bytes")
        checked += 1
    return checked


def check_audit_fixture(path):
    fixture = json.loads(path.read_text())
    prev = GENESIS
    for row in fixture["rows"]:
        if bytes.fromhex(row["prev_hash"]) != prev:
            raise AssertionError(f"{path.name}: row {row['id']} does not follow its predecessor")
        _, digest = audit_hash(row)
        if digest.hex() != row["hash"]:
            raise AssertionError(f"{path.name}: row {row['id']} hash differs from the spec's")
        prev = digest
    for checkpoint in fixture["checkpoints"]:
        message = checkpoint_message(
            checkpoint["last_audit_id"], bytes.fromhex(checkpoint["head_hash"]), checkpoint["signed_at_micros"]
        )
        public = serialization.load_der_public_key(bytes.fromhex(fixture["public_key_spki_der"]))
        public.verify(bytes.fromhex(checkpoint["signature_der"]), message, ec.ECDSA(hashes.SHA256()))
        if checkpoint["head_hash"] != next(r["hash"] for r in fixture["rows"] if r["id"] == checkpoint["last_audit_id"]):
            raise AssertionError(f"{path.name}: checkpoint does not name its row's hash")
    return len(fixture["rows"]) + len(fixture["checkpoints"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    stale = []
    for name, make in GENERATED.items():
        text = render(make())
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        elif not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if not args.check:
        return 0
    failures = [f"{name}: differs from what the spec implementation derives" for name in stale]
    for name, check in ((FIXTURE_SEALED, check_sealed_fixture), (FIXTURE_AUDIT, check_audit_fixture)):
        path = OUT / name
        if not path.exists():
            failures.append(f"{name}: missing")
            continue
        try:
            count = check(path)
            print(f"{name}: {count} values verified against the spec")
        except Exception as error:  # noqa: BLE001 - report every failure, then exit 1
            failures.append(f"{name}: {error!r}")
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if failures:
        return 1
    print(f"{len(GENERATED)} vector files match {SPEC}; fixtures open and verify")
    return 0


if __name__ == "__main__":
    sys.exit(main())
