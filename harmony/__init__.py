"""The harmony format for gpt-oss: the o200k_harmony encoding, the renderer and the streaming parser.

This package knows neither the engine nor HTTP; it turns harmony messages into token ids and
token ids back into messages, exactly as openai-harmony (the official implementation) does.
"""

from harmony.messages import (
    Author,
    ChannelConfig,
    Content,
    DeveloperContent,
    Message,
    ReasoningEffort,
    ResponseFormat,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
    ToolNamespace,
    browser_namespace,
    python_namespace,
)
from harmony.parser import HarmonyParseError, StreamParser, StreamState, parse_messages
from harmony.render import Renderer, RenderError
from harmony.tokens import (
    HarmonyEncoding,
    TokenizerFormatError,
    TokenizerNotFoundError,
    encoding_from_ranks,
    load_harmony_encoding,
    o200k_harmony_special_tokens,
)
from harmony.tool_schema import ToolSchemaError, schema_to_typescript

__all__ = [
    "Author",
    "ChannelConfig",
    "Content",
    "DeveloperContent",
    "HarmonyEncoding",
    "HarmonyParseError",
    "Message",
    "ReasoningEffort",
    "RenderError",
    "Renderer",
    "ResponseFormat",
    "Role",
    "StreamParser",
    "StreamState",
    "SystemContent",
    "TextContent",
    "TokenizerFormatError",
    "TokenizerNotFoundError",
    "ToolDescription",
    "ToolNamespace",
    "ToolSchemaError",
    "browser_namespace",
    "encoding_from_ranks",
    "load_harmony_encoding",
    "o200k_harmony_special_tokens",
    "parse_messages",
    "python_namespace",
    "schema_to_typescript",
]
