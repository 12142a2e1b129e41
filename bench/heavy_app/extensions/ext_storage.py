"""Storage as Dify's ext_storage picks it: by STORAGE_TYPE, local files by default (Dify's default is
OpenDAL on the local file system); S3 through boto3, whose client parses botocore's service model."""

import boto3


def init_app(app):
    if app.config["STORAGE_TYPE"] == "s3":
        app.extensions["storage"] = boto3.client(
            "s3", region_name=app.config["S3_REGION"], aws_access_key_id="local", aws_secret_access_key="local",
            endpoint_url="http://127.0.0.1:9")
    else:
        app.extensions["storage"] = app.config["STORAGE_LOCAL_PATH"]
