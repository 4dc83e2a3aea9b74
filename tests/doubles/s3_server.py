"""moto's S3 server on 127.0.0.1 for tests (moto is a test dependency, not a runtime one)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class S3Server:
    """Where a local S3 server listens, and credentials it accepts (moto accepts any)."""

    endpoint: str
    access_key: str = "test-access-key"
    secret_key: str = "test-secret-key-do-not-log"
    region: str = "us-east-1"

    def environ(self) -> dict[str, str]:
        """The environment a pod gets from its S3 secret, pointing at this server."""
        return {
            "AWS_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free port of 127.0.0.1 (moto is a test dependency, not a runtime one)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(endpoint=f"http://{host}:{port}")
    finally:
        server.stop()
