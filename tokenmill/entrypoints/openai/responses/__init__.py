"""The OpenAI Responses API (`/v1/responses`): request models, the bounded store behind
`previous_response_id`, the streamed event sequence, and the routes."""
