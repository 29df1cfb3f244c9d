"""Conversions between our harmony types and openai-harmony's, for differential tests."""

from __future__ import annotations

from typing import Any

import openai_harmony as oh

from harmony import (
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    TextContent,
    ToolNamespace,
)

_EFFORT = {
    ReasoningEffort.LOW: oh.ReasoningEffort.LOW,
    ReasoningEffort.MEDIUM: oh.ReasoningEffort.MEDIUM,
    ReasoningEffort.HIGH: oh.ReasoningEffort.HIGH,
}


def _namespace(ns: ToolNamespace) -> oh.ToolNamespaceConfig:
    return oh.ToolNamespaceConfig(
        name=ns.name,
        description=ns.description,
        tools=[
            oh.ToolDescription(name=t.name, description=t.description, parameters=t.parameters)
            for t in ns.tools
        ],
    )


def _namespaces(namespaces: tuple[ToolNamespace, ...]) -> dict[str, oh.ToolNamespaceConfig] | None:
    if not namespaces:
        return None
    return {ns.name: _namespace(ns) for ns in namespaces}


def to_oracle_content(item: Any) -> oh.Content:
    if isinstance(item, TextContent):
        return oh.TextContent(text=item.text)
    if isinstance(item, SystemContent):
        config = item.channel_config
        return oh.SystemContent(
            model_identity=item.model_identity,
            reasoning_effort=None
            if item.reasoning_effort is None
            else _EFFORT[item.reasoning_effort],
            conversation_start_date=item.conversation_start_date,
            knowledge_cutoff=item.knowledge_cutoff,
            channel_config=None
            if config is None
            else oh.ChannelConfig(
                valid_channels=list(config.valid_channels),
                channel_required=config.channel_required,
            ),
            tools=_namespaces(item.tools),
        )
    if isinstance(item, DeveloperContent):
        assert not item.response_formats, "openai-harmony 0.0.8 has no response formats"
        return oh.DeveloperContent(instructions=item.instructions, tools=_namespaces(item.tools))
    raise TypeError(item)


def to_oracle_message(message: Message) -> oh.Message:
    return oh.Message(
        author=oh.Author(role=oh.Role(message.author.role.value), name=message.author.name),
        content=[to_oracle_content(c) for c in message.content],
        channel=message.channel,
        recipient=message.recipient,
        content_type=message.content_type,
    )


def to_oracle_conversation(messages: list[Message]) -> oh.Conversation:
    return oh.Conversation.from_messages([to_oracle_message(m) for m in messages])


def oracle_role(role: Role | None) -> oh.Role | None:
    return None if role is None else oh.Role(role.value)


def message_key(message: Message) -> tuple:
    """A parsed message of ours as comparable plain data."""
    return (
        message.author.role.value,
        message.author.name,
        message.channel,
        message.recipient,
        message.content_type,
        tuple(c.text for c in message.content),
    )


def oracle_message_key(message: oh.Message) -> tuple:
    return (
        message.author.role.value,
        message.author.name,
        message.channel,
        message.recipient,
        message.content_type,
        tuple(c.text for c in message.content),
    )
