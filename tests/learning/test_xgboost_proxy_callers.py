"""The site's XGBoost proxy listens on 127.0.0.1, where every local account can connect: it answers only its
own process (XGBoost's worker in the agent), so another program that finds the port can neither put values
into the site's part of a sum nor get the other sites' pooled histograms back."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest

from fedhealth.learning._xgboost_proxy import SERVICE, decode_request, peer_is_this_process
from support import allreduce_request

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the caller check reads Linux's /proc")


def test_the_request_helper_is_what_the_proxy_decodes():
    fields = decode_request(allreduce_request(np.array([1.0, 2.0])))
    assert (fields[4], fields[5]) == (2, 2)
    assert np.frombuffer(fields[3], dtype="<f8").tolist() == [1.0, 2.0]


def test_a_call_from_the_proxys_own_process_is_answered(proxy):
    server, session, address = proxy
    with grpc.insecure_channel(address) as channel:
        reply = channel.unary_unary(f"/{SERVICE}/Allreduce")(allreduce_request(np.array([0.5, 1.25, -2.0])))
    assert np.frombuffer(reply[2:], dtype="<f8").tolist() == [1.5, 3.75, -6.0]  # field 1, length 24
    assert len(session.sums) == 1
    assert server.refused == 0


def test_a_call_from_another_process_is_refused_before_anything_is_summed(proxy):
    server, session, address = proxy
    attacker = textwrap.dedent(
        f"""
        import grpc
        request = {allreduce_request(np.zeros(4))!r}
        with grpc.insecure_channel({address!r}) as channel:
            try:
                channel.unary_unary("/{SERVICE}/Allreduce")(request)
                print("ANSWERED")
            except grpc.RpcError as exc:
                print(exc.code().name, exc.details())
        """
    )
    out = subprocess.run([sys.executable, "-c", attacker], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PERMISSION_DENIED only this site's XGBoost worker may call its proxy"
    assert session.sums == []  # nothing went into the site's part of a sum
    assert server.refused == 1
    assert server.error is None  # the site's own training is not failed by it
    with grpc.insecure_channel(address) as channel:  # and the worker is still answered
        channel.unary_unary(f"/{SERVICE}/Allreduce")(allreduce_request(np.ones(2)))
    assert len(session.sums) == 1


def test_a_peer_that_is_no_socket_of_this_process_is_not_taken_for_one(proxy):
    server, _, _ = proxy
    assert peer_is_this_process("ipv4:127.0.0.1:1", server.port) is False  # no such connection
    assert peer_is_this_process("ipv6:[::1]:4242", server.port) is False
    assert peer_is_this_process("unix:/tmp/x", server.port) is False
    assert peer_is_this_process("ipv4:127.0.0.1:x", server.port) is False
    assert peer_is_this_process("ipv6:[::ffff:127.0.0.1]:1", server.port) is False


def test_the_mapped_form_of_the_peer_is_checked_like_the_ipv4_one(proxy):
    server, _, address = proxy
    with grpc.insecure_channel(address) as channel:  # checked while the connection is open
        channel.unary_unary(f"/{SERVICE}/Allreduce")(allreduce_request(np.ones(2)))
        (peer,) = server._peers  # the worker's connection, as gRPC named it: ipv4:127.0.0.1:P
        port = peer.rsplit(":", 1)[1]
        assert peer_is_this_process(peer, server.port) is True
        assert peer_is_this_process(f"ipv6:[::ffff:127.0.0.1]:{port}", server.port) is True
