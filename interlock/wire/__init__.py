"""Every message that crosses a boundary: requests, outputs, routing decisions, codecs."""

from ._codec import converter, from_builtins, to_builtins
from ._events import WorkerChanged, WorkerJoined, WorkerLeft
from ._output import EngineOutput, FinishReason, Usage
from ._request import (
    ChatRequest,
    PrefillResult,
    PreprocessedRequest,
    RouterConfigOverride,
    RoutingHints,
    SamplingOptions,
)
from ._routing import (
    CandidateRecord,
    Leg,
    ModelRewriteDecision,
    RoutingDecision,
    SelectionRecord,
)

__all__ = [
    "CandidateRecord",
    "ChatRequest",
    "EngineOutput",
    "FinishReason",
    "Leg",
    "ModelRewriteDecision",
    "PrefillResult",
    "PreprocessedRequest",
    "RouterConfigOverride",
    "RoutingDecision",
    "RoutingHints",
    "SamplingOptions",
    "SelectionRecord",
    "Usage",
    "WorkerChanged",
    "WorkerJoined",
    "WorkerLeft",
    "converter",
    "from_builtins",
    "to_builtins",
]

# The worker protocol's frame codec (docs/wire-protocol.md); its message classes are in
# interlock.wire._frames, used through interlock.engines.remote.
from ._frames import (
    MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    FrameParser,
    ProtocolError,
    decode_body,
    encode_frame,
)

# vLLM's KV-event feed (ZMQ frames + msgpack batches), read by interlock.engines.openai.
from ._vllm import (
    REPLAY_END_SEQ,
    KvBatchDecoder,
    KvBatchLayout,
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmKvBatch,
    VllmKvDecodeError,
    VllmKvEvent,
    VllmKvMessage,
    decode_kv_batch,
    encode_kv_batch,
    kv_message_frames,
    kv_topic,
    parse_kv_message,
    parse_replay_reply,
    parse_replay_request,
    replay_end_frames,
    replay_reply_frames,
    replay_request_frames,
)

__all__ += [
    "MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "FrameParser",
    "ProtocolError",
    "decode_body",
    "encode_frame",
]

__all__ += [
    "REPLAY_END_SEQ",
    "KvBatchDecoder",
    "KvBatchLayout",
    "VllmAllBlocksCleared",
    "VllmBlockRemoved",
    "VllmBlockStored",
    "VllmKvBatch",
    "VllmKvDecodeError",
    "VllmKvEvent",
    "VllmKvMessage",
    "decode_kv_batch",
    "encode_kv_batch",
    "kv_message_frames",
    "kv_topic",
    "parse_kv_message",
    "parse_replay_reply",
    "parse_replay_request",
    "replay_end_frames",
    "replay_reply_frames",
    "replay_request_frames",
]
