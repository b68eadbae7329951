"""A throwaway PostgreSQL server for the tests: `initdb` into a temporary folder, `pg_ctl start` on a free loopback
port with password (SCRAM) authentication, stopped and removed afterwards. PostgreSQL refuses to run as root, so
under root the server runs as `nobody`, in a folder that user owns."""
import os
from pathlib import Path
import shutil
import subprocess
import tempfile

USER, PASSWORD = "postgres", "test-secret"
UNPRIVILEGED = "nobody"


def postgres_bin():
    """The folder of PostgreSQL's server programs (Debian keeps them off PATH, in /usr/lib/postgresql/N/bin), or
    None when PostgreSQL is not installed."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent  # where its siblings (pg_ctl) are
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


class PostgresServer:
    """A server on 127.0.0.1:`port`, its superuser USER with PASSWORD; `database(name)` creates one."""

    def __init__(self, bin_dir, port):
        self.bin_dir, self.port = Path(bin_dir), port
        self.folder = Path(tempfile.mkdtemp(prefix="postgres-"))
        self.data = self.folder / "data"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.folder, UNPRIVILEGED)

    def run(self, program, *args):
        """Run one of PostgreSQL's programs, as `nobody` under root."""
        command = [str(self.bin_dir / program), *map(str, args)]
        if self.as_root:
            command = ["runuser", "-u", UNPRIVILEGED, "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True, cwd=self.folder, timeout=120)

    def start(self):
        password_file = self.folder / "password"
        password_file.write_text(PASSWORD + "\n")
        if self.as_root:
            shutil.chown(password_file, UNPRIVILEGED)
        self.run("initdb", "-D", self.data, "-U", USER, "--auth-local=trust", "--auth-host=scram-sha-256",
                 f"--pwfile={password_file}", "--no-sync")
        options = f"-p {self.port} -h 127.0.0.1 -k {self.folder} -c fsync=off"
        self.run("pg_ctl", "-D", self.data, "-l", self.folder / "server.log", "-o", options, "-w", "start")
        return self

    def stop(self):
        try:
            self.run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database, password=PASSWORD, port=None):
        return f"postgresql://{USER}:{password}@127.0.0.1:{port or self.port}/{database}"

    def database(self, name):
        """A new, empty database `name` on the server; its URL."""
        import psycopg
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
