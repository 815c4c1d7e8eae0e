"""Text requests in full feature phase: SendTargets (RFC 7143 Appendix C) and the paging of long answers.

Strategy: a request's keys are answered into one text block; a block longer than the initiator's
MaxRecvDataSegmentLength is sent in pieces, each with the C bit and a target transfer tag that the initiator
returns (with an empty request) to fetch the next piece (RFC 7143 11.10.4).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .negotiation import encode_text, parse_text, NegotiationError
from .pdu import RESERVED_TAG, TextRequest, TextResponse

if TYPE_CHECKING:
    from .connection import Connection
    from .portal import IscsiService

log = logging.getLogger("trioscsi.iscsi")


class TextResponder:
    def __init__(self, service: IscsiService) -> None:
        self.service = service
        self._pages: dict[int, tuple[int, bytes]] = {}   # TTT -> (ITT, rest of the answer)
        self._partial: dict[int, bytearray] = {}         # ITT -> request text so far (C bit)
        self._next_ttt = 1

    def respond(self, connection: Connection, request: TextRequest) -> TextResponse:
        if request.ttt != RESERVED_TAG:
            page = self._pages.pop(request.ttt, None)
            if page is None or page[0] != request.itt:
                return self._answer(connection, request, b"", final=True)
            return self._page(connection, request, page[1])
        text = self._partial.pop(request.itt, bytearray()) + bytes(request.data)
        if request.cont:
            self._partial[request.itt] = text
            return self._answer(connection, request, b"", final=False, cont=False)
        try:
            pairs = parse_text(bytes(text))
        except NegotiationError:
            pairs = []
        answer: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                answer += self.send_targets(connection, value)
            else:
                answer.append((key, "NotUnderstood"))
        return self._page(connection, request, encode_text(answer))

    def _page(self, connection: Connection, request: TextRequest, body: bytes) -> TextResponse:
        limit = connection.max_send_segment
        if len(body) <= limit:
            return self._answer(connection, request, body, final=True)
        ttt = self._next_ttt
        self._next_ttt = (ttt % 0x7FFFFFFF) + 1
        self._pages[ttt] = (request.itt, body[limit:])
        return self._answer(connection, request, body[:limit], final=False, cont=True, ttt=ttt)

    def _answer(self, connection: Connection, request: TextRequest, data: bytes, *, final: bool,
                cont: bool = False, ttt: int = RESERVED_TAG) -> TextResponse:
        statsn, expcmdsn, maxcmdsn = connection.status()
        return TextResponse(final=final, cont=cont, lun=request.lun, itt=request.itt, ttt=ttt, statsn=statsn,
                            expcmdsn=expcmdsn, maxcmdsn=maxcmdsn, data=data)

    def send_targets(self, connection: Connection, value: str) -> list[tuple[str, str]]:
        """SendTargets=All lists every target (discovery sessions only); a name or empty lists one."""
        session = connection.session
        assert session is not None
        visible = {t.config.name for t in self.service.visible_targets(session.initiator_name,
                                                                         connection.address)}
        if value == "All":
            if not session.is_discovery:
                return [("SendTargets", "Reject")]
            names = [name for name in self.service.targets if name in visible]
        elif value == "":
            names = [session.target_name] if session.target_name else []
        else:
            names = [value] if value in visible else []
        local = connection.stream.socket.getsockname()
        pairs: list[tuple[str, str]] = []
        for name in names:
            exported = self.service.targets.get(name or "")
            if exported is None:
                continue
            pairs.append(("TargetName", name))
            for host, port in self._addresses(local):
                pairs.append(("TargetAddress", f"{host}:{port},{exported.config.tpgt}"))
        return pairs

    def _addresses(self, local: tuple) -> list[tuple[str, int]]:
        """Every portal address, with a wildcard one replaced by the address the initiator reached."""
        out = []
        for host, port in self.service.bound:
            if host in ("0.0.0.0", "::"):
                host = local[0]
            out.append((f"[{host}]" if ":" in host else host, port))
        return out
