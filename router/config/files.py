"""The files a config names, read once it has validated: the JWT key PEMs (`auth.jwt`).

Validation checks the config's shape only; reading belongs to loading it, which `check-config`,
`serve` and a reload (in a thread, off the event loop) all do. An unreadable file is a problem
at the key that names it, like any other, and a reload that meets one changes nothing.
"""

from __future__ import annotations

from router.config.loader import Path
from router.config.model import Config, JwtConfig

KEY_FILE_MAX_BYTES = 64 * 1024  # a PEM key is a few KB


class FileProblems(ValueError):
    """Files that could not be read: (the YAML path of the key naming each, why), every one."""

    def __init__(self, problems: list[tuple[Path, str]]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems


def read_files(config: Config) -> Config:
    """`config` with the bytes of the files it names; FileProblems when one cannot be read."""
    jwt = config.auth.jwt
    if jwt is None:
        return config
    try:
        loaded = read_jwt_keys(jwt)
    except FileProblems as exc:
        raise FileProblems([(("auth", "jwt", *path), message)
                            for path, message in exc.problems]) from None
    if loaded is jwt:
        return config
    return config.model_copy(update={"auth": config.auth.model_copy(update={"jwt": loaded})})


def read_jwt_keys(jwt: JwtConfig) -> JwtConfig:
    """The section with its key files' bytes (unchanged for HS256, which has a secret);
    FileProblems, with paths within the section, when a file cannot be read."""
    if jwt.algorithm == "HS256":
        return jwt
    files = {"public_key_file": jwt.public_key_file, "private_key_file": jwt.private_key_file}
    pems: dict[str, bytes] = {}
    problems: list[tuple[Path, str]] = []
    for key, path in files.items():
        if not path:  # no private key: this router verifies tokens, it does not issue them
            continue
        try:
            pems[key] = _read(path)
        except OSError as exc:
            problems.append(((key,), f"cannot read {path}: {exc.strerror or exc}"))
    if problems:
        raise FileProblems(problems)
    return jwt.with_pems(pems["public_key_file"], pems.get("private_key_file"))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(KEY_FILE_MAX_BYTES)
