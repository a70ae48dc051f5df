"""An attacker's audit of the SQL connector's one-statement rule and read-only guarantee (docs/connectors.md),
against what PostgreSQL, MySQL and MariaDB read otherwise than the statement check.

The query is the site's (a study names a dataset only by its registered name), so these play a query file
pasted from elsewhere: each query below is one the databases read as more than one statement, or as a
``SELECT`` that writes a file (``INTO OUTFILE``, which a read-only transaction does not stop) or takes row
locks, while a naive reading sees one plain ``SELECT``.
"""

from __future__ import annotations

import uuid
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from fedhealth.data import UnsafeQueryError, check_read_only_sql, open_dataset
from support import MYSQL_URL, mysql_admin, mysql_database


@pytest.mark.parametrize(
    "query",
    [
        # MySQL reads 1e1INTO as the number 1e1, then INTO: the server writes the file
        "SELECT 1e1INTO OUTFILE '/tmp/fedhealth-attack'",
        "SELECT * FROM victim WHERE x = 1e1FOR UPDATE",
        # "$" is part of a name on MySQL and PostgreSQL alike: a$b$ is an alias, not a dollar-quoted string
        "SELECT 1 AS a$b$ INTO OUTFILE '/tmp/fedhealth-attack' -- $b$",
        "SELECT 1 AS a$b$; COMMIT; DELETE FROM victim; SELECT $b$",
        "SELECT $x$ AS c FROM victim; DELETE FROM victim; SELECT 1 AS $x$",  # MySQL: two names $x$
        # MariaDB runs the text of a /*M! comment as it runs MySQL's /*!
        "SELECT * FROM victim /*M! INTO OUTFILE '/tmp/fedhealth-attack' */",
        "SELECT * FROM victim /*M!100000 ; DELETE FROM victim */",
        # MySQL's older spelling of a shared row lock
        "SELECT * FROM victim LOCK IN SHARE MODE",
        "SELECT * FROM victim lock\n in  share\tmode",
        # PostgreSQL ends a line comment at a carriage return as well as at a newline
        "SELECT 1 -- a comment\r; COMMIT; DELETE FROM victim",
        "SELECT * FROM victim -- a comment\r FOR UPDATE",
    ],
)
def test_the_statement_check_reads_a_query_as_the_databases_do(query):
    with pytest.raises(UnsafeQueryError):
        check_read_only_sql(query)


@pytest.mark.parametrize(
    "query",
    [
        "CALL wipe()",
        "SET autocommit = 1",
        "SET TRANSACTION READ WRITE",
        "HANDLER victim OPEN",
        "TABLE victim",
        "VALUES (1, 2)",
        "DO sleep(1)",
        "LOAD DATA INFILE '/etc/passwd' INTO TABLE victim",
        "EXPLAIN ANALYZE DELETE FROM victim",
        "\ufeffSELECT 1",  # a byte-order mark before SELECT is no whitespace to either database
        "(SELECT 1) UNION (SELECT 2); DELETE FROM victim",
        "SELECT 1 INTO @leaked",
        "SELECT * FROM victim FOR  NO KEY UPDATE",
    ],
)
def test_every_statement_but_a_select_is_refused_whatever_comes_before_it(query):
    with pytest.raises(UnsafeQueryError):
        check_read_only_sql(query)


@pytest.mark.parametrize(
    "query",
    [
        "SELECT patient_id, into_count, x_into FROM victim",
        "SELECT $$a dollar string$$ AS a, 1 AS x",
        "SELECT 1.5e3 AS x, 'LOCK IN SHARE MODE' AS y -- FOR UPDATE\n",
        "SELECT price$ AS x FROM victim",
    ],
)
def test_a_plain_select_with_look_alike_words_still_passes(query):
    check_read_only_sql(query)


@pytest.mark.mysql
@pytest.mark.parametrize(
    "into",
    [
        "SELECT 1e1INTO OUTFILE '{path}'",
        "SELECT 1 AS a$q$ INTO OUTFILE '{path}' -- $q$",
        "SELECT 1 AS y /*M! INTO OUTFILE '{path}' */",
    ],
)
def test_a_select_the_check_misread_never_writes_a_file_on_the_mysql_server(into):
    """A read-only transaction does not stop SELECT ... INTO OUTFILE (a file is no table): the statement
    check is the only guard, so a query it misreads must not reach the server."""
    path = f"/tmp/fedhealth-attack-{uuid.uuid4().hex}"
    url = sa.engine.make_url(MYSQL_URL)
    with mysql_database("stmt") as database:
        uri = url.set(database=database).render_as_string(hide_password=False)
        with pytest.raises(UnsafeQueryError):
            open_dataset(f"sql+{uri}?query={quote(into.format(path=path))}&label=y")
    with mysql_admin().connect() as conn:
        assert conn.exec_driver_sql(f"SELECT load_file('{path}') IS NULL").scalar_one() == 1
