"""marshmallow schemas: each protocol's request bodies, and the response shapes of the OpenAPI document."""
