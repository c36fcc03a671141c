"""Drives localkms with Python grpcio's default Unix-socket channel (a C-core gRPC stack).

C-core sends the percent-encoded socket path as :authority, which the Rust HTTP/2 stack
refuses on its own; localkms's authority shim must make these calls succeed. Messages are
encoded by hand (no generated stubs), so the only dependency is `grpcio`.

Usage: python3 grpcio_client.py unix:///path/to/kms.sock
Prints one JSON object with what each call returned; exits non-zero on any failure.
"""
import json
import os
import sys

import grpc


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, payload):
    """A length-delimited protobuf field."""
    return varint((num << 3) | 2) + varint(len(payload)) + payload


def parse(msg):
    """Length-delimited fields of a protobuf message, by field number."""
    out, i = {}, 0
    while i < len(msg):
        key, shift = 0, 0
        while True:
            b = msg[i]
            i += 1
            key |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        num, wire = key >> 3, key & 7
        assert wire == 2, "unexpected wire type %d" % wire
        length, shift = 0, 0
        while True:
            b = msg[i]
            i += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        out[num] = msg[i : i + length]
        i += length
    return out


def call(channel, path, request):
    ident = lambda b: b
    rpc = channel.unary_unary(path, request_serializer=ident, response_deserializer=ident)
    return rpc(request, timeout=10)


def main():
    target = sys.argv[1]
    result = {"grpcio": grpc.__version__}
    with grpc.insecure_channel(target) as channel:
        status = parse(call(channel, "/v2.KeyManagementService/Status", b""))
        result["version"] = status[1].decode()
        result["healthz"] = status[2].decode()
        result["key_id"] = status[3].decode()

        seed = os.urandom(32)
        enc = parse(call(channel, "/v2.KeyManagementService/Encrypt", field(1, seed) + field(2, b"py-uid")))
        result["encrypt_key_id"] = enc[2].decode()
        dec = parse(
            call(
                channel,
                "/v2.KeyManagementService/Decrypt",
                field(1, enc[1]) + field(2, b"py-uid") + field(3, enc[2]),
            )
        )
        result["round_trip"] = dec.get(1) == seed

        version = parse(call(channel, "/v1beta1.KeyManagementService/Version", field(1, b"v1beta1")))
        result["v1_version"] = version[1].decode()
        result["v1_runtime_name"] = version[2].decode()
        v1enc = parse(call(channel, "/v1beta1.KeyManagementService/Encrypt", field(1, b"v1beta1") + field(2, seed)))
        v1dec = parse(call(channel, "/v1beta1.KeyManagementService/Decrypt", field(1, b"v1beta1") + field(2, v1enc[1])))
        result["v1_round_trip"] = v1dec.get(1) == seed

        try:
            call(channel, "/v2.KeyManagementService/Decrypt", field(1, b"garbage") + field(3, enc[2]))
            result["bad_decrypt_code"] = "OK"
        except grpc.RpcError as e:
            result["bad_decrypt_code"] = e.code().name
    print(json.dumps(result))


if __name__ == "__main__":
    main()
