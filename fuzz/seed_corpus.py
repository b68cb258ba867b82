#!/usr/bin/env python3
"""Seeds fuzz/corpus/<target>/ from the interoperability vectors.

Run from the repository root: python3 fuzz/seed_corpus.py
Files are named by the SHA-1 of their content, as libFuzzer names what it finds, so
re-running adds nothing twice.
"""
import base64
import hashlib
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
VECTORS = json.loads((ROOT / "tests/fixtures/awala-vectors.json").read_text())
CORPUS = ROOT / "fuzz/corpus"
INCOMING = "tech.relaycorp.awala.endpoint-internet.incoming-service-message"
SERVER = "0" + "a" * 64


def put(target, data):
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)


def http(headers, body):
    head = "\n".join(f"{n}:{v}" for n, v in headers)
    return head.encode() + b"\n\n" + body


params = []
for group in ("valid_connection_params", "not_issued_by_sender", "handler_errors",
              "invalid_connection_params", "accepted_edge_cases"):
    for case in VECTORS[group]:
        der = base64.b64decode(case["params_der_b64"])
        params.append((case["sender_id"], der))
        put("connection_params", der)

requests = []
for key in VECTORS["endpoint_keys"]:
    content = key.get("pairing_request_content")
    if content:
        requests.append((key["endpoint_id"], content.encode()))
        put("pairing_request", content.encode())
    spki = key["spki_der_b64"]
    put("pairing_request", f"alice@example.com,bob@EXAMPLE.org,{spki}".encode())

for case in VECTORS["node_base64_decoding"]:
    put("pairing_request", f"a@b.io,c@d.io,{case['input']}".encode())

sender, body = requests[0]
base = [
    ("ce-specversion", "1.0"),
    ("ce-id", "parcel-1"),
    ("ce-source", sender),
    ("ce-type", INCOMING),
    ("ce-subject", SERVER),
    ("content-type", "application/vnd.relaycorp.letro.pairing-request-tmp"),
]
put("cloudevent", http(base, body))
put("cloudevent", http(base + [("ce-time", "2026-01-01T00:00:00Z"),
                               ("ce-expiry", "2026-03-01T00:00:00.000Z"),
                               ("ce-knativearrivaltime", "2026-01-01T00:00:01Z")], body))
put("cloudevent", http([(n, v.replace("0", "%30", 1)) if n == "ce-source" else (n, v)
                        for n, v in base], body))
put("cloudevent", http(base + [("ce-id", "again")], body))
put("cloudevent", http([(n.upper(), v) for n, v in base], b""))
sender, der = params[0]
put("cloudevent", http(base[:-1] + [("content-type",
                                     "application/vnd.relaycorp.letro.pairing-auth-tmp")], der))
structured = {
    "specversion": "1.0", "id": "parcel-2", "source": sender, "type": INCOMING,
    "subject": SERVER, "datacontenttype": "application/vnd.relaycorp.letro.pairing-request-tmp",
    "data_base64": base64.b64encode(body).decode(),
}
put("cloudevent", http([("content-type", "application/cloudevents+json")],
                       json.dumps(structured).encode()))
structured.pop("data_base64")
structured["data"] = body.decode()
put("cloudevent", http([("content-type", "application/cloudevents+json; charset=utf-8")],
                       json.dumps(structured).encode()))

# VeraId signature bundles: every vector of veraid/tests/fixtures (valid, refused and
# lenient), and the DNS messages of one chain.
VERAID = json.loads((ROOT / "veraid/tests/fixtures/veraid-vectors.json").read_text())
for case in VERAID["cases"]:
    put("signature_bundle", base64.b64decode(case["bundle_der_b64"]))
