import numpy
import pandas
import sympy


def init_app(app):
    frame = pandas.DataFrame({"x": numpy.arange(10)})
    app.extensions["numeric"] = (frame, sympy.Symbol("x"))
