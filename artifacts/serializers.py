from __future__ import annotations

import math

from rest_framework import serializers

from artifacts.models import Artifact, ArtifactKind

MAX_METADATA_DEPTH = 32


def validate_json_metadata(value):
    """JSON that PostgreSQL's jsonb accepts: an object, no NUL characters, lone surrogates or
    infinite numbers anywhere, nested at most MAX_METADATA_DEPTH levels (walked without recursion,
    so no depth can crash the walk)."""
    if not isinstance(value, dict):
        raise serializers.ValidationError("Metadata must be a JSON object.")
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                raise serializers.ValidationError("Null characters are not allowed.")
            if not node.isascii() and any("\ud800" <= ch <= "\udfff" for ch in node):
                raise serializers.ValidationError("Lone surrogates (\\ud800-\\udfff) are not allowed.")
        if isinstance(node, float) and not math.isfinite(node):  # 1e999 reads as infinity
            raise serializers.ValidationError("Numbers must be finite.")
        if isinstance(node, (dict, list)) and depth > MAX_METADATA_DEPTH:
            raise serializers.ValidationError(f"Metadata may nest at most {MAX_METADATA_DEPTH} levels.")
        if isinstance(node, dict):
            stack.extend((item, depth + 1) for pair in node.items() for item in pair)
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)
    return value


class MetadataField(serializers.JSONField):
    """JSON text (a form field or the query string): the decoder's RecursionError on deep nesting
    is a refusal, not a 500."""

    def to_internal_value(self, data):
        try:
            return super().to_internal_value(data)
        except RecursionError:
            raise serializers.ValidationError(f"Metadata may nest at most {MAX_METADATA_DEPTH} levels.") from None


class ArtifactSerializer(serializers.ModelSerializer):
    content_url = serializers.SerializerMethodField()
    owner = serializers.SlugRelatedField(
        slug_field="username", read_only=True, help_text="Who uploaded it; empty for the runner's own artifacts."
    )

    class Meta:
        model = Artifact
        fields = [
            "id", "name", "kind", "size", "sha256", "content_type", "metadata", "owner", "created_at", "content_url",
        ]  # fmt: skip
        read_only_fields = fields

    def get_content_url(self, artifact) -> str:
        return f"/api/artifacts/{artifact.pk}/content/"


class UploadParamsSerializer(serializers.Serializer):
    """Fields of an upload, from the form (multipart) or the query string (raw body)."""

    name = serializers.CharField(max_length=1000, required=False, allow_blank=True, default="")
    kind = serializers.ChoiceField(choices=ArtifactKind.choices, default=ArtifactKind.OTHER)
    task = serializers.UUIDField(required=False, allow_null=True, default=None)
    role = serializers.CharField(max_length=64, required=False, allow_blank=True, default="")
    metadata = MetadataField(required=False, default=dict, binary=True, validators=[validate_json_metadata])
    sha256 = serializers.RegexField(r"^[0-9a-fA-F]{64}$", required=False, allow_blank=True, default="")


class MultipartUploadSerializer(UploadParamsSerializer):
    file = serializers.FileField()


class ArtifactFilterSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=ArtifactKind.choices, required=False)
    task = serializers.UUIDField(required=False)
