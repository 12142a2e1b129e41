import httpx
import openai
from openai.types.chat import ChatCompletion  # noqa: F401 - the model types Dify's runtime loads


def init_app(app):
    app.extensions["llm"] = openai.OpenAI(api_key="local", base_url="http://127.0.0.1:9/v1",
                                          http_client=httpx.Client())
