"""The real `redis-server` the tests run against lives in the package (the benchmark starts it
too); tests import it from here."""

from router.bench.redis_server import START_TIMEOUT_S, RedisServer, free_port, ping, start_redis

__all__ = ["START_TIMEOUT_S", "RedisServer", "free_port", "ping", "start_redis"]
