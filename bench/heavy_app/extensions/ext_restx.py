from flask import Blueprint
from flask_restx import Api, Namespace, Resource, fields


def init_app(app):
    blueprint = Blueprint("service_api", __name__, url_prefix="/v1")
    api = Api(blueprint, doc=False)
    for index in range(20):
        namespace = Namespace(f"ns{index}")
        model = namespace.model(f"Item{index}", {"id": fields.String, "name": fields.String, "size": fields.Integer})

        class Items(Resource):
            @namespace.marshal_with(model)
            def get(self):
                return []
        namespace.add_resource(Items, "/items")
        api.add_namespace(namespace)
    app.register_blueprint(blueprint)
