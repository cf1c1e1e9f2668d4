"""gRPC health probe for gradserve (the image's HEALTHCHECK and compose's health check).

    python healthcheck.py [HOST:PORT] [--tls-ca FILE] [--timeout SECONDS]

Asks `grpc.health.v1.Health/Check` for the empty service name (the whole server) and exits 0 when
the answer is SERVING, 1 otherwise (not serving, draining, unreachable). Health stays open when the
server requires a token, so the probe needs none. Only grpcio and grpcio-health-checking, which
gradserve installs, are used: nothing is fetched at build time.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:50051")
    parser.add_argument("--tls-ca", default=None, help="PEM CA certificate, when the server serves TLS")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if args.tls_ca is not None:
        with open(args.tls_ca, "rb") as f:
            channel = grpc.secure_channel(args.address, grpc.ssl_channel_credentials(root_certificates=f.read()))
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"{args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
