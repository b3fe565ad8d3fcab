"""How a command reaches etcd: one set of flags for every command that takes ``--etcd``
(``interlock serve``, ``route``, ``worker`` and ``register``), read into one `EtcdOptions`.

`add_etcd_arguments` adds the flags (``--etcd``, ``--etcd-prefix``, the user and TLS flags,
and for registering commands ``--etcd-ttl``); `etcd_options` reads and checks them, reading
the password and the TLS files; `EtcdOptions.client` opens an `EtcdClient` with them. The
password never comes from a flag's value or the URL (``ps`` shows both): from
`PASSWORD_ENV` or ``--etcd-password-file`` (docs/deploying.md#securing-etcd).
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping
from pathlib import Path

import attrs

from .._argtypes import positive_int
from .._errors import ConfigError
from ._etcd import DEFAULT_PREFIX, PASSWORD_ENV, EtcdClient, check_etcd_url

__all__ = ["EtcdOptions", "add_etcd_arguments", "etcd_options"]

#: The flags that only mean something with ``--etcd``, by their namespace attribute.
_DEPENDENT_FLAGS = {
    "etcd_user": "--etcd-user",
    "etcd_password_file": "--etcd-password-file",
    "etcd_ca_file": "--etcd-ca-file",
    "etcd_cert_file": "--etcd-cert-file",
    "etcd_key_file": "--etcd-key-file",
}


@attrs.frozen(kw_only=True)
class EtcdOptions:
    """Where etcd is and how to reach it: ``url`` (``http://`` or ``https://``), the key
    ``prefix`` the workers' records live under, the ``user`` and ``password`` to
    authenticate as (None: no authentication), and for ``https://``: the CA file that signed
    etcd's certificate (None: the system's CAs) and this process's client certificate and
    key (None: none)."""

    url: str
    prefix: str = DEFAULT_PREFIX
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def tls(self) -> bool:
        """Whether the URL is ``https://``."""
        return self.url.startswith("https://")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS settings for an ``https://`` URL (None for ``http://``): etcd's
        certificate checked against ``ca_file`` (or the system's CAs), and the client
        certificate when given. Reads the files.

        Raises:
            ConfigError: a file cannot be read or is not what its flag needs (the message
                names the flag).
        """
        if not self.tls:
            return None
        for flag, path in (
            ("--etcd-ca-file", self.ca_file),
            ("--etcd-cert-file", self.cert_file),
            ("--etcd-key-file", self.key_file),
        ):
            if path is not None:
                _check_readable(flag, path)
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"--etcd-ca-file {self.ca_file!r}: not a PEM CA certificate ({exc})"
            ) from None
        if self.cert_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"--etcd-cert-file {self.cert_file!r} and --etcd-key-file "
                    f"{self.key_file!r}: not a PEM certificate and its private key ({exc})"
                ) from None
        return context

    def client(self, *, timeout: float = 5.0) -> EtcdClient:
        """An `EtcdClient` with these settings (it connects at its first call).

        Raises:
            ConfigError: a TLS file cannot be read (`ssl_context`).
        """
        return EtcdClient(
            self.url,
            timeout=timeout,
            user=self.user,
            password=self.password,
            ssl_context=self.ssl_context(),
        )

    def describe(self) -> str:
        """The URL, with the user and client certificate when there are (for banners; never
        the password). Pure."""
        text = self.url
        if self.user is not None:
            text += f" as etcd user {self.user!r}"
        if self.cert_file is not None:
            text += " with a client certificate"
        return text


def _check_readable(flag: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path!r}: cannot read it ({exc.strerror or exc})") from None


def add_etcd_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    url_help: str,
    prefix_help: str,
    ttl_help: str | None = None,
    required: bool = False,
) -> None:
    """Add ``--etcd URL`` (``required`` or not; ``url_help`` says what the command does
    with it), ``--etcd-prefix`` (``prefix_help``), ``--etcd-ttl`` when ``ttl_help`` is given
    (commands that register), and the user and TLS flags that `etcd_options` reads."""
    parser.add_argument("--etcd", metavar="URL", required=required, default=None, help=url_help)
    parser.add_argument("--etcd-prefix", default=DEFAULT_PREFIX, metavar="PREFIX", help=prefix_help)
    if ttl_help is not None:
        parser.add_argument(
            "--etcd-ttl", type=positive_int, default=10, metavar="SECONDS", help=ttl_help
        )
    parser.add_argument(
        "--etcd-user",
        metavar="NAME",
        default=None,
        help=f"authenticate to etcd as this user, its password in {PASSWORD_ENV} or "
        "--etcd-password-file (docs/deploying.md#securing-etcd)",
    )
    parser.add_argument(
        "--etcd-password-file",
        metavar="PATH",
        default=None,
        help=f"the --etcd-user's password: this file's first line (or {PASSWORD_ENV}); it is "
        "never given on the command line, where `ps` shows it",
    )
    parser.add_argument(
        "--etcd-ca-file",
        metavar="PATH",
        default=None,
        help="with an https:// --etcd: trust etcd's certificate only when this CA (PEM) "
        "signed it (default: the system's CAs)",
    )
    parser.add_argument(
        "--etcd-cert-file",
        metavar="PATH",
        default=None,
        help="with an https:// --etcd: this process's TLS client certificate (PEM), for an "
        "etcd run with --client-cert-auth; with --etcd-key-file",
    )
    parser.add_argument(
        "--etcd-key-file",
        metavar="PATH",
        default=None,
        help="the private key (PEM) of --etcd-cert-file",
    )


def etcd_options(
    args: argparse.Namespace, *, environ: Mapping[str, str] | None = None
) -> EtcdOptions | None:
    """The `EtcdOptions` the flags of `add_etcd_arguments` give (None without ``--etcd``),
    checked: the URL, the prefix, the user and its password (from ``--etcd-password-file``,
    else `PASSWORD_ENV` in ``environ``, default the process's), and the TLS files (read).

    Raises:
        ConfigError: a flag or file is wrong, or one is missing that another needs (the
            message names the flag and says what to give).
    """
    env = os.environ if environ is None else environ
    url: str | None = getattr(args, "etcd", None)
    if url is None:
        for name, flag in _DEPENDENT_FLAGS.items():
            if getattr(args, name, None) is not None:
                raise ConfigError(f"{flag} needs --etcd URL (etcd's client URL)")
        return None
    check_etcd_url(url, "--etcd")
    prefix: str = getattr(args, "etcd_prefix", DEFAULT_PREFIX)
    if not prefix.strip("/"):
        raise ConfigError(
            "--etcd-prefix must not be empty (workers, `interlock register` and frontends "
            "must give the same one)"
        )
    user: str | None = getattr(args, "etcd_user", None)
    password_file: str | None = getattr(args, "etcd_password_file", None)
    password: str | None = None
    if password_file is not None:
        if user is None:
            raise ConfigError("--etcd-password-file needs --etcd-user NAME (whose password it is)")
        try:
            lines = Path(password_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"--etcd-password-file {password_file!r}: cannot read it ({exc})"
            ) from None
        password = lines[0] if lines else ""
        if not password:
            raise ConfigError(f"--etcd-password-file {password_file!r}: its first line is empty")
    elif user is not None:
        password = env.get(PASSWORD_ENV)
        if not password:
            raise ConfigError(
                f"--etcd-user {user!r} needs its password: put it in {PASSWORD_ENV} or in a "
                "file given with --etcd-password-file PATH (never on the command line)"
            )
    elif env.get(PASSWORD_ENV):
        raise ConfigError(
            f"{PASSWORD_ENV} is set but --etcd-user is not: give --etcd-user NAME (whose "
            f"password it is), or unset {PASSWORD_ENV}"
        )
    if user is not None and not user.strip():
        raise ConfigError("--etcd-user must not be empty")
    options = EtcdOptions(
        url=url,
        prefix=prefix,
        user=user,
        password=password,
        ca_file=getattr(args, "etcd_ca_file", None),
        cert_file=getattr(args, "etcd_cert_file", None),
        key_file=getattr(args, "etcd_key_file", None),
    )
    tls_flags = [
        flag
        for flag, path in (
            ("--etcd-ca-file", options.ca_file),
            ("--etcd-cert-file", options.cert_file),
            ("--etcd-key-file", options.key_file),
        )
        if path is not None
    ]
    if tls_flags and not options.tls:
        raise ConfigError(
            f"{tls_flags[0]} is for an etcd that serves TLS: give --etcd an https:// URL "
            f"(got {url!r})"
        )
    if (options.cert_file is None) != (options.key_file is None):
        raise ConfigError(
            "--etcd-cert-file and --etcd-key-file go together: a client certificate and its "
            "private key"
        )
    options.ssl_context()  # reads the files now: a bad one is a flag error, not an etcd one
    return options
